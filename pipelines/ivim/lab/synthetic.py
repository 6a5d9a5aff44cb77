"""Synthetic abdominal diffusion-weighted MR studies, written as real DICOM.

A numerical phantom (body outline, subcutaneous fat, liver, spleen, kidneys,
a liver lesion) with literature-like IVIM parameters per tissue is imaged
with a b-value protocol and several diffusion directions, Rician noise added,
and written as classic single-frame MR (one instance per slice, b-value and
direction) or as one Enhanced MR multi-frame instance. The b-values go into
the standard Diffusion b-value attribute, or only into a vendor's private
attribute, to exercise every place the pipeline looks for them.

Used by ``aigw demo``, the tests and the benchmark; nothing here is
downloaded.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom import Dataset
from pydicom.dataset import FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage

from gateway.contract import derived_uid
from pipelines.ivim.lab.signal import ivim_signal

__all__ = ["DEMO_BVALUES", "TISSUES", "DwiStudy", "make_dwi_study", "phantom"]

DEMO_BVALUES = (0.0, 10.0, 20.0, 40.0, 80.0, 150.0, 300.0, 500.0, 800.0)



#: Tissue: (D mm2/s, f, D* mm2/s, S0 arbitrary units). Values in the range of
#: published abdominal IVIM studies at 1.5/3 T.
TISSUES: dict[str, tuple[float, float, float, float]] = {
    "background": (0.0, 0.0, 0.0, 0.0),
    "fat": (0.3e-3, 0.05, 0.02, 450.0),
    "muscle": (1.4e-3, 0.10, 0.03, 600.0),
    "liver": (1.1e-3, 0.25, 0.06, 800.0),
    "spleen": (0.8e-3, 0.15, 0.04, 1000.0),
    "kidney": (1.9e-3, 0.30, 0.05, 1100.0),
    "lesion": (1.6e-3, 0.10, 0.03, 1200.0),
}


@dataclass
class DwiStudy:
    """Paths of a written study and the ground truth that generated it."""

    paths: list[Path]
    bvalues: tuple[float, ...]
    labels: np.ndarray  # (slices, rows, cols) tissue index into TISSUES
    d: np.ndarray
    f: np.ndarray
    dstar: np.ndarray
    s0: np.ndarray


def phantom(size: int, slices: int) -> np.ndarray:
    """Tissue labels (slices, size, size) of a simplified axial abdomen."""
    names = list(TISSUES)
    yy, xx = np.mgrid[-1 : 1 : size * 1j, -1 : 1 : size * 1j]
    out = np.zeros((slices, size, size), dtype=np.uint8)

    def ellipse(cx: float, cy: float, rx: float, ry: float) -> np.ndarray:
        return ((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2 <= 1.0

    for z in range(slices):
        t = z / max(1, slices - 1)
        lab = out[z]
        lab[ellipse(0, 0, 0.92, 0.72)] = names.index("fat")
        lab[ellipse(0, 0, 0.84, 0.64)] = names.index("muscle")
        lab[ellipse(-0.30, -0.05, 0.42 - 0.06 * t, 0.40)] = names.index("liver")
        lab[ellipse(0.48, -0.15, 0.18, 0.22 + 0.04 * t)] = names.index("spleen")
        lab[ellipse(-0.35, 0.38, 0.12, 0.16)] = names.index("kidney")
        lab[ellipse(0.30, 0.38, 0.12, 0.16)] = names.index("kidney")
        lab[ellipse(-0.25 + 0.05 * t, -0.15, 0.09, 0.09)] = names.index("lesion")
    return out


def _base_dataset(study_uid: str, series_uid: str, seed: int) -> Dataset:
    ds = Dataset()
    ds.PatientName = "IVIM^PHANTOM"
    ds.PatientID = f"PHANTOM{seed:04d}"
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "O"
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.FrameOfReferenceUID = derived_uid("ivim-phantom", seed, "for")
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = "20260101"
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = "120000"
    ds.StudyID = "1"
    ds.AccessionNumber = f"ACC{seed:04d}"
    ds.ReferringPhysicianName = ""
    ds.Modality = "MR"
    ds.Manufacturer = "aigw synthetic"
    ds.ManufacturerModelName = "ivim phantom"
    ds.DeviceSerialNumber = "0"
    ds.SoftwareVersions = "1"
    ds.SeriesNumber = 7
    ds.SeriesDescription = "DWI IVIM abdomen"
    ds.BodyPartExamined = "ABDOMEN"
    ds.MagneticFieldStrength = 1.5
    ds.ScanningSequence = "EP"
    ds.SequenceVariant = "SK\\SP"
    ds.ScanOptions = "FS"
    ds.MRAcquisitionType = "2D"
    ds.RepetitionTime = 4000.0
    ds.EchoTime = 60.0
    ds.EchoTrainLength = 64
    ds.ImagingFrequency = 63.87
    ds.ImagedNucleus = "1H"
    ds.SliceThickness = 5.0
    ds.SpacingBetweenSlices = 6.0
    ds.PatientPosition = "HFS"
    ds.PositionReferenceIndicator = ""
    return ds


def _pixels(ds: Dataset, img: np.ndarray) -> None:
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = img.shape[-2:]
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.PixelData = np.clip(np.rint(img), 0, 65535).astype("<u2").tobytes()


def _vendor_b(ds: Dataset, b: float, vendor: str) -> None:
    """Write the b-value where the given vendor writes it."""
    if vendor == "standard":
        ds.DiffusionBValue = float(b)
    elif vendor == "siemens":
        ds.add_new(0x00190010, "LO", "SIEMENS MR HEADER")
        ds.add_new(0x0019100C, "IS", str(int(round(b))))
    elif vendor == "ge":
        ds.add_new(0x00430010, "LO", "GEMS_PARM_01")
        ds.add_new(0x00431039, "IS", [str(int(round(b))), "8", "0", "0"])
    elif vendor == "philips":
        ds.add_new(0x20010010, "LO", "Philips Imaging DD 001")
        ds.add_new(0x20011003, "FL", float(b))
    elif vendor != "none":
        raise ValueError(f"unknown vendor {vendor!r}")


def make_dwi_study(
    folder: Path,
    seed: int = 0,
    *,
    size: int = 96,
    slices: int = 4,
    bvalues: Sequence[float] = DEMO_BVALUES,
    directions: int = 3,
    snr: float = 40.0,
    vendor: str = "standard",
    enhanced: bool = False,
) -> DwiStudy:
    """Write a synthetic DWI series into ``folder`` and return it with its truth.

    Parameters
    ----------
    seed : int
        Sets the noise and the UIDs (the same seed writes the same files).
    directions : int
        Diffusion directions per b > 0 (the phantom is isotropic, so each
        direction carries the same signal with independent noise).
    snr : float
        S0 of liver divided by the noise sigma (Rician noise).
    vendor : {"standard", "siemens", "ge", "philips", "none"}
        Where the b-value is written; "none" writes no b-value at all.
    enhanced : bool
        Write one Enhanced MR multi-frame instance instead of single frames.
    """
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    labels = phantom(size, slices)
    table = np.array(list(TISSUES.values()), dtype=np.float64)
    d, f, dstar, s0 = (table[labels, i] for i in range(4))
    sigma = TISSUES["liver"][3] / snr
    study_uid = derived_uid("ivim-phantom", seed, "study")
    series_uid = derived_uid("ivim-phantom", seed, "series", vendor, enhanced)
    base = _base_dataset(study_uid, series_uid, seed)
    spacing = round(380.0 / size, 5)  # DS values hold at most 16 characters
    frames: list[tuple[int, float, tuple[float, float, float], np.ndarray]] = []
    dirs = [(1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0), (0.577, 0.577, 0.577)][: max(1, directions)]
    for z in range(slices):
        for b in bvalues:
            clean = ivim_signal(np.array([b]), d[z].ravel(), f[z].ravel(), dstar[z].ravel(), s0[z].ravel())
            clean = clean.reshape(size, size)
            for g in dirs if b > 0 else [(0.0, 0.0, 0.0)]:
                noisy = np.hypot(clean + rng.normal(0, sigma, clean.shape), rng.normal(0, sigma, clean.shape))
                frames.append((z, float(b), g, noisy))
    position = lambda z: [-190.0, -190.0, -30.0 + 6.0 * z]  # noqa: E731
    paths: list[Path] = []
    if not enhanced:
        for k, (z, b, g, img) in enumerate(frames):
            ds = base.copy()
            ds.SOPClassUID = MRImageStorage
            ds.SOPInstanceUID = derived_uid(series_uid, "instance", k)
            ds.InstanceNumber = k + 1
            ds.ImageType = ["ORIGINAL", "PRIMARY", "DIFFUSION", "NONE"]
            ds.ImagePositionPatient = position(z)
            ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
            ds.PixelSpacing = [spacing, spacing]
            ds.SliceLocation = position(z)[2]
            ds.AcquisitionNumber = 1
            _vendor_b(ds, b, vendor)
            if vendor == "standard":
                ds.DiffusionDirectionality = "DIRECTIONAL" if b > 0 else "NONE"
                if b > 0:
                    ds.DiffusionGradientOrientation = list(g)
            _pixels(ds, img)
            paths.append(_save(ds, folder / f"dwi_{k:04d}.dcm"))
    else:
        paths.append(_save(_enhanced(base, series_uid, frames, position, spacing), folder / "dwi_enhanced.dcm"))
    return DwiStudy(paths, tuple(float(b) for b in bvalues), labels, d, f, dstar, s0)


def _enhanced(
    base: Dataset,
    series_uid: str,
    frames: list[tuple[int, float, tuple[float, float, float], np.ndarray]],
    position: object,
    spacing: float,
) -> Dataset:
    """One Enhanced MR instance with the b-value in the MR Diffusion functional group."""
    ds = base.copy()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.4.1"
    ds.SOPInstanceUID = derived_uid(series_uid, "enhanced")
    ds.InstanceNumber = 1
    ds.ImageType = ["ORIGINAL", "PRIMARY", "DIFFUSION", "NONE"]
    ds.NumberOfFrames = len(frames)
    shared = Dataset()
    pm = Dataset()
    pm.PixelSpacing = [spacing, spacing]
    pm.SliceThickness = 5.0
    shared.PixelMeasuresSequence = DicomSequence([pm])
    po = Dataset()
    po.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    shared.PlaneOrientationSequence = DicomSequence([po])
    ds.SharedFunctionalGroupsSequence = DicomSequence([shared])
    per = []
    for z, b, g, _ in frames:
        item = Dataset()
        pp = Dataset()
        pp.ImagePositionPatient = position(z)  # type: ignore[operator]
        item.PlanePositionSequence = DicomSequence([pp])
        diff = Dataset()
        diff.DiffusionBValue = float(b)
        diff.DiffusionDirectionality = "DIRECTIONAL" if b > 0 else "NONE"
        if b > 0:
            gd = Dataset()
            gd.DiffusionGradientOrientation = list(g)
            diff.DiffusionGradientDirectionSequence = DicomSequence([gd])
        item.MRDiffusionSequence = DicomSequence([diff])
        per.append(item)
    ds.PerFrameFunctionalGroupsSequence = DicomSequence(per)
    _pixels(ds, np.stack([img for *_, img in frames]))
    return ds


def _save(ds: Dataset, path: Path) -> Path:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta = meta
    ds.save_as(path, enforce_file_format=True)
    return path
