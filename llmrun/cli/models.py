"""Store commands: ``import``, ``pull``, ``list``, ``show``, ``rm``, ``cp``, ``catalog``, ``prune``, ``verify``.

None of them imports llama_cpp (a test checks): they stay fast and work without it.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from llmrun.cli.output import format_count, format_size, notice, print_json, print_rows, stdin_is_tty, stdout_is_tty
from llmrun.errors import ExitCode, LlmrunError
from llmrun.settings import get_settings
from llmrun.store.store import ModelEntry, Store

if TYPE_CHECKING:
    from llmrun.store.hub import QuantChoice, RepoQuants
    from llmrun.store.integrity import Verdict
    from llmrun.store.models import PullOptions

JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")]


def _store() -> Store:
    return Store(get_settings().home)


def import_command(
    path: Annotated[
        Path,
        typer.Argument(
            help="A .gguf file (for a split model, its -00001-of- part).", show_default=False, metavar="PATH"
        ),
    ],
    name: Annotated[
        str | None, typer.Option("--name", "-n", help="Name in the store [default: from the file name].")
    ] = None,
    link: Annotated[bool, typer.Option("--link", help="Reference the file where it is instead of copying it.")] = False,
    force: Annotated[bool, typer.Option("--force", "-f", help="Replace a model of the same name.")] = False,
) -> None:
    """Add a GGUF file already on disk to the store (validated first)."""
    from llmrun.store.models import import_model

    entry = import_model(_store(), path, name, link=link, replace=force)
    how = "linked" if link else "copied"
    notice(f"imported {entry.name} ({format_size(entry.size_bytes)}, {how}, sha256 {entry.sha256[:12]})")


def _pick_on_terminal(quants: RepoQuants) -> QuantChoice | None:
    """Ask which quantization to pull, when a terminal is there to ask."""
    if not (sys.stdin.isatty() and sys.stderr.isatty()):
        return None
    _print_quants(quants, to_stderr=True)
    while True:
        answer = int(typer.prompt(f"Pull which one? (1-{len(quants.choices)})", type=int, err=True))
        if 1 <= answer <= len(quants.choices):
            return quants.choices[answer - 1]


def _fit(size_bytes: int, available: int | None) -> str:
    """Rough: the file plus a KV cache and compute buffers of about a sixth of it, against free memory."""
    if available is None:
        return "?"
    needed = size_bytes * 7 // 6 + (256 << 20)
    if needed <= available * 0.8:
        return "yes"
    return "tight" if needed <= available else "no"


def _print_quants(quants: RepoQuants, to_stderr: bool = False) -> None:
    from llmrun.machine import available_memory_bytes
    from llmrun.store.quants import quant_note

    available = available_memory_bytes()
    rows = [
        [str(index), choice.label, format_size(choice.size), _fit(choice.size, available), quant_note(choice.label),
         choice.first.path + (f" (+{len(choice.files) - 1} parts)" if len(choice.files) > 1 else "")]
        for index, choice in enumerate(quants.choices, start=1)
    ]  # fmt: skip
    print_rows(["#", "QUANT", "SIZE", "FITS", "NOTE", "FILE"], rows, sys.stderr if to_stderr else None)


def pull_options(*, quiet: bool = False, update: bool = False) -> PullOptions:
    """How the CLI pulls: into the configured cache, with a progress bar and a picker on a terminal."""
    from llmrun.cli.progress import DownloadProgress, SilentProgress
    from llmrun.store.models import PullOptions

    settings = get_settings()
    return PullOptions(
        hub_cache=settings.hub_cache,
        shared_cache=settings.hf_cache is not None,
        update=update,
        progress=SilentProgress if quiet else DownloadProgress,
        choose=_pick_on_terminal,
        on_status=(lambda message: None) if quiet else notice,
    )


def pull_command(
    model: Annotated[
        str,
        typer.Argument(
            help="A catalog name (smollm2, qwen2.5:0.5b), owner/repo, owner/repo:QUANT or hf.co/owner/repo:QUANT.",
            show_default=False,
            metavar="MODEL",
        ),
    ],
    list_quants_only: Annotated[
        bool, typer.Option("--list", help="List the repo's quantizations with size and fit; download nothing.")
    ] = False,
    update: Annotated[bool, typer.Option("--update", help="Fetch the newest revision if the Hub has one.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Print nothing but errors.")] = False,
) -> None:
    """Download a model from the Hugging Face Hub (or a catalog model's fallback source), verified."""
    from llmrun.store.hub import list_quants
    from llmrun.store.models import pull_model, pull_target_repo

    if list_quants_only:
        _print_quants(list_quants(pull_target_repo(model)))
        return
    options = pull_options(quiet=quiet, update=update)
    result = pull_model(_store(), model, options)
    if quiet:
        return
    entry = result.entry
    if result.downloaded:
        notice(f"pulled {entry.name} ({format_size(entry.size_bytes)}, sha256 {entry.sha256[:12]})")
    else:
        notice(f"already have {entry.name} ({format_size(entry.size_bytes)})")
    if result.newer_revision:
        notice(
            f"the Hub has a newer revision ({result.newer_revision[:10]}); get it with `llmrun pull {model} --update`"
        )


def _list_row(entry: ModelEntry, problem: str | None) -> list[str]:
    info = entry.info
    params = info.get("parameter_count")
    return [
        entry.name,
        str(info.get("architecture", "?")),
        format_count(params) if isinstance(params, int) else "?",
        str(info.get("quantization", "?")),
        format_size(entry.size_bytes),
        entry.added_at.replace("T", " ").split("+")[0] or "?",
        "damaged" if problem else "ok",
    ]


def list_command(json_output: JsonOption = False) -> None:
    """List the models in the store; a damaged one is marked, and stderr says what to run."""
    store = _store()
    entries = store.entries()
    problems = {entry.name: store.problem(entry) for entry in entries}  # a stat per file, no hashing
    if json_output:
        print_json([{**entry.to_dict(), "status": "damaged" if problems[entry.name] else "ok",
                     "problem": problems[entry.name]} for entry in entries])  # fmt: skip
    elif not entries:
        notice(f"no models yet in {store.home}; try `llmrun pull smollm2`")
    else:
        rows = [_list_row(entry, problems[entry.name]) for entry in entries]
        print_rows(["NAME", "ARCH", "PARAMS", "QUANT", "SIZE", "ADDED", "STATUS"], rows)
        if stdout_is_tty():
            notice(f"{len(entries)} model(s), {format_size(store.total_size(entries))} in {store.home}")
    damaged = [name for name, problem in problems.items() if problem]
    for name in damaged:
        notice(f"warning: {name} is damaged: {problems[name]}")
    if damaged:
        notice(f"run `llmrun verify --repair {' '.join(damaged)}` to mend, or `llmrun rm` to remove")


def _show_fields(name: str, path: Path, info: dict[str, Any], entry: ModelEntry | None) -> list[tuple[str, str]]:
    context = info.get("context_length")
    fields = [
        ("name", name),
        ("architecture", str(info.get("architecture"))),
        ("parameters", format_count(info["parameter_count"])),
        ("quantization", str(info.get("quantization"))),
        ("context length", str(context) if context else "unknown"),
        ("size on disk", format_size(info["size_bytes"])),
        ("chat template", "yes" if info.get("has_chat_template") else "no"),
        ("license", info.get("license") or "unknown"),
        ("path", str(path)),
    ]
    if entry is not None:
        fields += [("sha256", entry.sha256), ("source", entry.source), ("added", entry.added_at)]
    return fields


def show_command(
    model: Annotated[
        str,
        typer.Argument(
            help="A model name from `llmrun list`, or a path to a .gguf file.", show_default=False, metavar="MODEL"
        ),
    ],
    json_output: JsonOption = False,
    template: Annotated[
        bool, typer.Option("--template", help="Print the model's chat template and nothing else.")
    ] = False,
) -> None:
    """Show a model's architecture, size, quantization, context length, template and license."""
    from llmrun.store.gguf_file import read_model_info
    from llmrun.store.models import resolve_model

    resolved = resolve_model(_store(), model)
    info = read_model_info(resolved.path)
    if template:
        if not info.chat_template:
            raise LlmrunError(f"{resolved.name} has no chat template", "run it with --raw for plain completion")
        sys.stdout.write(info.chat_template.rstrip("\n") + "\n")
        return
    details = info.to_dict()
    if json_output:
        # "name" is the name in the store; the file's own general.name is "general_name".
        data: dict[str, Any] = {**details, "general_name": details.get("name")}
        data.update(name=resolved.name, path=str(resolved.path))
        if resolved.entry is not None:
            data.update(sha256=resolved.entry.sha256, source=resolved.entry.source, added_at=resolved.entry.added_at)
        print_json(data)
        return
    fields = _show_fields(resolved.name, resolved.path, details, resolved.entry)
    width = max(len(label) for label, _ in fields)
    for label, value in fields:
        sys.stdout.write(f"{label:<{width}}  {value}\n")


def rm_command(
    models: Annotated[
        list[str], typer.Argument(help="Model names from `llmrun list`.", show_default=False, metavar="MODEL...")
    ],
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")] = False,
) -> None:
    """Remove models from the store (files of --link imports are left alone)."""
    store = _store()
    entries = [store.get(name) for name in models]
    if not yes and stdin_is_tty() and sys.stderr.isatty():
        names = ", ".join(f"{entry.name} ({format_size(entry.size_bytes)})" for entry in entries)
        if not typer.confirm(f"Remove {names}?", default=False, err=True):
            raise LlmrunError("nothing removed", "answer y to remove, or pass -y")
    for entry in entries:
        freed = store.remove(entry.name)
        notice(f"removed {entry.name}" + (f", freed {format_size(freed)}" if freed else ""))


def cp_command(
    source: Annotated[
        str, typer.Argument(help="A model name from `llmrun list`.", show_default=False, metavar="SOURCE")
    ],
    destination: Annotated[str, typer.Argument(help="The new name.", show_default=False, metavar="DESTINATION")],
    force: Annotated[bool, typer.Option("--force", "-f", help="Replace a model of that name.")] = False,
) -> None:
    """Give a model another name (its files are shared, not copied)."""
    entry = _store().copy(source, destination, replace=force)
    notice(f"copied {source} to {entry.name}")


def catalog_command(json_output: JsonOption = False) -> None:
    """List the catalog: short names for popular models, the Hub repo and quantization each pulls, and your own."""
    from llmrun.store.catalog import load_catalog

    store = _store()
    entries = list(load_catalog().values())
    if json_output:
        print_json([{"name": e.alias, "repo": e.repo, "quant": e.quant, "file": e.file, "description": e.description,
                     "origin": e.origin, "pulled": store.find(e.alias) is not None} for e in entries])  # fmt: skip
        return
    rows = [[e.alias, e.quant, e.repo, "yes" if store.find(e.alias) else "", e.origin, e.description] for e in entries]
    print_rows(["NAME", "QUANT", "REPO", "PULLED", "ORIGIN", "DESCRIPTION"], rows)


def prune_command() -> None:
    """Delete files no model uses: old revisions, orphaned blobs, partial downloads and copies."""
    settings = get_settings()
    removed, freed = _store().prune(None if settings.hf_cache else settings.hub_cache)
    notice(f"removed {removed} file(s), freed {format_size(freed)}")


def _verify_progress(total: int) -> Any:
    """A bar over the bytes to hash, on a terminal only."""
    from llmrun.cli.progress import DownloadProgress, SilentProgress

    return (DownloadProgress if sys.stderr.isatty() else SilentProgress)(total=total, desc="verifying")


def _ask_to_remove_orphans(count: int, size: int, yes: bool) -> bool:
    if yes:
        return True
    if stdin_is_tty() and sys.stderr.isatty():
        return typer.confirm(f"Remove {count} file(s) no model uses ({format_size(size)})?", default=False, err=True)
    notice(f"left {count} file(s) no model uses ({format_size(size)}); pass --yes to remove them")
    return False


def verify_command(
    models: Annotated[
        list[str] | None,
        typer.Argument(
            help="Model names from `llmrun list` [default: every model].", show_default=False, metavar="[MODEL...]"
        ),
    ] = None,
    repair: Annotated[
        bool,
        typer.Option(
            "--repair",
            help="Fetch damaged models again from where they came from, rebuild unreadable "
            "manifests from their files, and remove files no model uses (after asking).",
        ),
    ] = False,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="With --repair: remove orphans without asking.")] = False,
    json_output: JsonOption = False,
) -> None:
    """Check stored models against their recorded sha256, size and GGUF header; exit 1 if any is damaged."""
    from llmrun.store.integrity import Unrepairable, Verdict, bytes_to_check, verify_entry
    from llmrun.store.integrity import repair as mend

    store = _store()
    entries = [store.get(name) for name in models] if models else store.entries()
    progress = _verify_progress(sum(bytes_to_check(entry) for entry in entries))
    verdicts: list[Verdict] = []
    try:
        for entry in entries:
            verdicts.append(Verdict(entry.name, verify_entry(store, entry, progress.update)))
    finally:
        progress.close()
    if repair:
        for index, verdict in enumerate(verdicts):
            if not verdict.problems:
                continue
            try:
                done = mend(store, entries[index], pull_options(quiet=json_output))
            except LlmrunError as error:  # Unrepairable, or the source failing: the rest are still tried
                why = str(error) if isinstance(error, Unrepairable) else f"could not repair it: {error}"
                verdicts[index] = Verdict(verdict.name, verdict.problems, unrepairable=why)
                continue
            after = verify_entry(store, store.get(verdict.name))
            verdicts[index] = Verdict(verdict.name, after, repaired=None if after else done)
    orphans = store.orphans() if not models else []
    removed = 0
    if repair and orphans and _ask_to_remove_orphans(len(orphans), sum(o.size for o in orphans), yes):
        removed = store.remove_orphans(orphans)
        orphans = []
    _report_verdicts(verdicts, orphans, removed, json_output)
    if any(verdict.problems and not verdict.repaired for verdict in verdicts):
        raise typer.Exit(ExitCode.RUNTIME_ERROR)


def _report_verdicts(verdicts: list[Verdict], orphans: list[Any], removed: int, json_output: bool) -> None:
    if json_output:
        print_json({
            "models": [{"name": v.name, "status": v.status, "problems": list(v.problems), "repaired": v.repaired,
                        "unrepairable": v.unrepairable} for v in verdicts],
            "orphans": [{"path": str(orphan.path), "size": orphan.size} for orphan in orphans],
            "orphan_bytes_removed": removed,
        })  # fmt: skip
        return
    rows = [[v.name, v.status, v.repaired or "; ".join([*v.problems, *([v.unrepairable] if v.unrepairable else [])])]
            for v in verdicts]  # fmt: skip
    if rows:
        print_rows(["NAME", "STATUS", "DETAIL"], rows)
    damaged = [v.name for v in verdicts if v.problems and not v.repaired]
    summary = f"{len(verdicts)} model(s) checked, {len(damaged)} damaged"
    if removed:
        summary += f"; removed files no model used ({format_size(removed)})"
    notice(summary)
    if orphans:
        notice(f"{len(orphans)} file(s) no model uses ({format_size(sum(o.size for o in orphans))}), e.g. "
               f"{orphans[0].path}; `llmrun verify --repair` or `llmrun prune` removes them")  # fmt: skip
    if damaged and not any(v.unrepairable for v in verdicts):
        notice(f"mend with `llmrun verify --repair {' '.join(damaged)}`, or remove with `llmrun rm`")
