"""vad-datasets: the data sets vad reads, each in its official on-disk layout.

``mvtec`` (MVTec AD), ``mvtec-loco`` (MVTec LOCO AD, with per-annotation regions and
saturation thresholds for AU-sPRO), ``visa`` (official one-class split), ``btad``, ``mpdd``,
``mvtec-3d`` (RGB images), ``folder`` (your own normal / abnormal / mask folders),
``multi-view`` (one category per camera view) and ``demo`` (embedded, built from
scikit-image's CC0 textures). Nothing is downloaded. Also adds ``vad datasets info``.

This entry module only registers import paths: nothing heavy is imported until a data set is used.
"""

from vad import hookimpl

DATASETS = (
    ("vad_datasets.mvtec:MVTecAD", "mvtec", "MVTec AD (15 categories) from --root in its official layout."),
    ("vad_datasets.loco:MVTecLOCO", "mvtec-loco", "MVTec LOCO AD: structural/logical anomalies, per-defect regions with sPRO saturation."),
    ("vad_datasets.visa:VisA", "visa", "VisA (12 objects) through its official split_csv/1cls.csv."),
    ("vad_datasets.mvtec:BTAD", "btad", "BTAD (products 01-03): train/ok, test/{ok,ko}, ground_truth/ko."),
    ("vad_datasets.mvtec:MPDD", "mpdd", "MPDD (6 metal-part categories) in the MVTec AD layout."),
    ("vad_datasets.mvtec:MVTec3D", "mvtec-3d", "MVTec 3D-AD, RGB images and their masks (XYZ ignored)."),
    ("vad_datasets.folder:FolderDataset", "folder", "Your own folders: normal dir, abnormal dirs, optional masks by name pattern."),
    ("vad_datasets.mvtec:MultiView", "multi-view", "One category per camera view, each view in the MVTec AD layout."),
    ("vad_datasets.demo:DemoDataset", "demo", "Embedded demo: brick/grass/gravel textures with synthetic scratches, stains, patches."),
)


@hookimpl
def vad_register_datasets(register):
    """Register every data set by import path."""
    for target, name, summary in DATASETS:
        register(target, name=name, summary=summary)


@hookimpl
def vad_register_commands(app):
    """Add ``vad datasets info``."""
    from vad_datasets.cli import datasets_app

    app.add_typer(datasets_app, name="datasets")
