"""vad-uninformed-students: Uninformed Students (Bergmann et al., CVPR 2020) as an image detector.

``--detector uninformed-students``: for each patch size (17, 33, 65 px receptive fields) a frozen
patch teacher gives a dense 128-d descriptor per pixel and an ensemble of students regresses it
on normal images; the ensemble's regression error and predictive variance, standardised on
held-out normal images, make the anomaly map. :meth:`vad_uninformed_students.detector.UninformedStudents.feature_source`
exposes the students' regression residual for feature-level ensembles. ``vad uninformed-students
distill`` distils the patch teachers from any vad backbone on any folder of images. See
:mod:`vad_uninformed_students.detector` for hyper-parameters and deviations. Its patch teachers
(:mod:`vad_uninformed_students.teacher`) also serve GCAD's local branch. Registration is lazy:
this module does not import torch.
"""

from vad import hookimpl

__version__ = "0.1.0"


@hookimpl
def vad_register_detectors(register):
    """Register the Uninformed Students detector."""
    register(
        "vad_uninformed_students.detector:UninformedStudents",
        name="uninformed-students",
        summary="Uninformed Students: student ensembles regressing dense patch-teacher descriptors at 3 receptive fields (CVPR 2020).",
    )


@hookimpl
def vad_register_commands(app):
    """Add ``vad uninformed-students distill``."""
    from vad_uninformed_students.cli import uninformed_students_app

    app.add_typer(uninformed_students_app, name="uninformed-students")
