"""``vad datasets info``: what a data set folder holds, per split and defect type.

Heavy imports stay inside the command so ``vad --help`` stays fast.
"""

from __future__ import annotations

from typing import Optional

import typer

datasets_app = typer.Typer(help="Inspect data sets (counts per split and defect type).", no_args_is_help=True)


def parse_options(pairs: list[str]) -> dict:
    """``["key=value", ...]`` -> dict; values are parsed as YAML (numbers, lists, booleans).

    Only the syntax is checked here: the data set's declared options validate the values when it
    is constructed (an unknown key or a bad value names the option and what it allows).
    """
    import yaml

    from vad.errors import VadError

    options = {}
    for pair in pairs:
        if "=" not in pair:
            raise VadError(f"--option expects key=value, got {pair!r}")
        key, value = pair.split("=", 1)
        options[key.strip()] = yaml.safe_load(value) if value.strip() else None
    return options


def count_rows(splits) -> list[tuple[str, str, int, int, int]]:
    """``(split, defect type, images, with mask, regions)`` for one category's splits."""
    rows = []
    for split_name in ("train", "validation", "test"):
        groups: dict[str, list] = {}
        for sample in getattr(splits, split_name):
            groups.setdefault(sample.defect_type, []).append(sample)
        for defect, samples in sorted(groups.items(), key=lambda item: (item[0] not in ("good", "ok"), item[0])):
            with_mask = sum(s.mask_loader is not None for s in samples)
            regions = sum(len(s.regions) for s in samples)
            rows.append((split_name, defect, len(samples), with_mask, regions))
    return rows


@datasets_app.command("info")
def info(
    name: str = typer.Argument(..., help="Data set name (vad list datasets)."),
    root: Optional[str] = typer.Option(None, "--root", help="Data set root folder."),
    category: Optional[list[str]] = typer.Option(None, "--category", "-c", help="Category; repeat; default all."),
    option: Optional[list[str]] = typer.Option(None, "--option", "-o", help="Data set option key=value (e.g. abnormal_dirs=[crack])."),
    # 0.1 here (not the data sets' declared 0.2): what this command has always shown.
    validation_fraction: float = typer.Option(0.1, "--validation-fraction", help="Share of normal training images held out."),
    skip_bad: bool = typer.Option(False, "--skip-bad", help="Skip unreadable images and list them."),
) -> None:
    """Counts per split and defect type, for each category."""
    from rich.console import Console
    from rich.table import Table

    from vad.plugins import get_registry

    cls = get_registry().load_class("datasets", name)
    dataset = cls(root=root, **{"validation_fraction": validation_fraction, "skip_bad": skip_bad, **parse_options(option or [])})
    console = Console()
    for cat in category or dataset.categories():
        splits = dataset.load(cat)
        table = Table(title=f"{name} / {cat}" + ("" if splits.has_masks else " (no pixel masks)"))
        for column in ("split", "defect type", "images", "with mask", "regions"):
            table.add_column(column, justify="left" if column in ("split", "defect type") else "right")
        for split_name, defect, images, with_mask, regions in count_rows(splits):
            table.add_row(split_name, defect, str(images), str(with_mask), str(regions))
        total = len(splits.train) + len(splits.validation) + len(splits.test)
        table.add_row("all", "", str(total), "", "", style="bold")
        console.print(table)
    skipped = getattr(dataset, "skipped", [])
    if skipped:
        console.print(f"[yellow]{len(skipped)} unreadable file(s) skipped:[/yellow]")
        for path, reason in skipped:
            console.print(f"  {path}: {reason}")
