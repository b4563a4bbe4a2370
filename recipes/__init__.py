"""Packaged recipes: `compress run recipe=NAME` finds `recipes/NAME.yaml` here."""
