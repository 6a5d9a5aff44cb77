"""UIDs inside result objects that must not change between runs of the same job."""

from __future__ import annotations

from pydicom import Dataset

__all__ = ["pin_dimension_organization"]


def pin_dimension_organization(ds: Dataset, uid: str) -> None:
    """Replace the Dimension Organization UID highdicom draws at random by ``uid``.

    A job that runs twice (at-least-once execution) sends the same SOP
    Instance UIDs; the UIDs inside them should not differ either, or two
    copies of one instance disagree on how its frames are organised (PS3.3
    C.7.6.17: the UID only has to identify the organisation, so one derived
    from the job is as valid as a random one).
    """
    for item in ds.get("DimensionOrganizationSequence", []):
        item.DimensionOrganizationUID = uid
    for item in ds.get("DimensionIndexSequence", []):
        if "DimensionOrganizationUID" in item:
            item.DimensionOrganizationUID = uid
