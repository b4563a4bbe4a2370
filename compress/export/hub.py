"""`compress push OUT REPO_ID`: upload a verified export to the Hugging Face Hub in one commit.

Refused: a folder that is not a compress export (no report.json / config.json / safetensors), or
whose reload check did not run or did not pass. The repository is created private unless `public`;
`revision` names a branch (created from main if missing). The model card's loading lines get the
repository id. The token comes from where huggingface_hub looks (HF_TOKEN, `hf auth login`); it is
never printed, logged or written.
"""

from __future__ import annotations

import json
from pathlib import Path

from compress.errors import UserError
from compress.export.card import PATH

RELOAD_TOLERANCE = 1e-3  # the largest reload |logit difference| accepted (the export checks far tighter)


def verified_export(folder: Path) -> dict:
    """The export's report, or a UserError naming what is missing or failed."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"{folder} is not a folder; give the output folder of `compress run`")
    report_path = folder / "report.json"
    if not report_path.is_file() or not (folder / "config.json").is_file():
        raise UserError(f"{folder} is not a compress export (no report.json and config.json); push only the output "
                        f"folder of `compress run`")
    if not list(folder.glob("*.safetensors")):
        raise UserError(f"{folder} has no safetensors weights; re-run the export")
    report = json.loads(report_path.read_text())
    difference = (report.get("export") or {}).get("reload_max_abs_logit_diff")
    if difference is None:
        raise UserError(f"{folder} was written without the reload check (export.verify=false); re-run the export "
                        f"with the check before pushing it")
    if not difference < RELOAD_TOLERANCE:
        raise UserError(f"{folder} failed its reload check (max |logit difference| {difference:.3g}); not pushed")
    return report


def push(folder: Path, repo_id: str, public: bool = False, revision: str | None = None, message: str | None = None,
         api=None, log=print) -> str:
    """Create the repository if needed and upload every file of `folder` in one commit; the commit URL."""
    from huggingface_hub import CommitOperationAdd, HfApi, get_token

    folder = Path(folder)
    report = verified_export(folder)
    if api is None:
        if get_token() is None:
            raise UserError("no Hugging Face token: run `hf auth login` or set HF_TOKEN (it is never printed)")
        api = HfApi()
    api.create_repo(repo_id=repo_id, private=not public, exist_ok=True, repo_type="model")
    if revision is not None:
        api.create_branch(repo_id=repo_id, branch=revision, exist_ok=True, repo_type="model")
    operations = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        relative = path.relative_to(folder).as_posix()
        if relative == "README.md":  # the card's loading lines name the repository
            content = path.read_text().replace(f'"{PATH}"', f'"{repo_id}"').encode()
            operations.append(CommitOperationAdd(path_in_repo=relative, path_or_fileobj=content))
        else:
            operations.append(CommitOperationAdd(path_in_repo=relative, path_or_fileobj=str(path)))
    stages = ", ".join(f"{s['method']} {s['config'].get('sparsity', 0):.0%}" if "sparsity" in s["config"]
                       else s["method"] for s in report.get("stages", []))
    message = message or f"compress: {report.get('model')} pruned ({stages})"
    info = api.create_commit(repo_id=repo_id, operations=operations, commit_message=message, revision=revision,
                             repo_type="model")
    url = getattr(info, "commit_url", None) or f"https://huggingface.co/{repo_id}"
    log(f"pushed {len(operations)} files of {folder} to {repo_id}{f' ({revision})' if revision else ''}"
        f"{'' if public else ' (private)'}: {url}")
    return url
