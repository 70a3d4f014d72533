"""WinCLIP's compositional prompt ensemble (paper Sec. 4.1): every state word crossed with every
template, for the normal and the anomalous class.

The lists are the paper's (its appendix figure of the prompt ensemble). anomalib 2.7's
``winclip/prompting.py`` differs in two places, both kept out of here on purpose:

* its anomalous states lack ``"broken {}"`` (4 states instead of 5);
* its 21 templates list ``"a jpeg corrupted photo of the {}."`` twice and lack
  ``"a cropped photo of a {}."`` and ``"a jpeg corrupted photo of a {}."`` (the paper gives each
  template once with "a" and once with "the": 22).

So the paper's ensemble has 7 x 22 = 154 normal and 5 x 22 = 110 anomalous prompts, anomalib's
7 x 21 = 147 and 4 x 21 = 84.
"""

from __future__ import annotations

#: State words of the normal class; ``{}`` is the object's name.
NORMAL_STATES = (
    "{}",
    "flawless {}",
    "perfect {}",
    "unblemished {}",
    "{} without flaw",
    "{} without defect",
    "{} without damage",
)

#: State words of the anomalous class.
ANOMALOUS_STATES = (
    "damaged {}",
    "broken {}",
    "{} with flaw",
    "{} with defect",
    "{} with damage",
)

#: Templates; ``{}`` is a state phrase.
TEMPLATES = (
    "a cropped photo of the {}.",
    "a cropped photo of a {}.",
    "a close-up photo of a {}.",
    "a close-up photo of the {}.",
    "a bright photo of a {}.",
    "a bright photo of the {}.",
    "a dark photo of the {}.",
    "a dark photo of a {}.",
    "a jpeg corrupted photo of a {}.",
    "a jpeg corrupted photo of the {}.",
    "a blurry photo of the {}.",
    "a blurry photo of a {}.",
    "a photo of a {}.",
    "a photo of the {}.",
    "a photo of a small {}.",
    "a photo of the small {}.",
    "a photo of a large {}.",
    "a photo of the large {}.",
    "a photo of the {} for visual inspection.",
    "a photo of a {} for visual inspection.",
    "a photo of the {} for anomaly detection.",
    "a photo of a {} for anomaly detection.",
)


def prompt_ensemble(class_name: str) -> tuple[list[str], list[str]]:
    """``(normal prompts, anomalous prompts)`` for an object called ``class_name``: each state
    phrase in each template, states outer, templates inner."""
    normal = [template.format(state.format(class_name)) for state in NORMAL_STATES for template in TEMPLATES]
    anomalous = [template.format(state.format(class_name)) for state in ANOMALOUS_STATES for template in TEMPLATES]
    return normal, anomalous
