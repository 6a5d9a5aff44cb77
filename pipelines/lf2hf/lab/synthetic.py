"""A synthetic low-field brain series written as real DICOM, for the demo and the tests.

The simulator (:mod:`pipelines.lf2hf.lab.simulator`) images the MNI152 anatomy at
low field; this module writes the result as a classic MR series with proper
geometry and MagneticFieldStrength, and keeps the 3 T truth next to it (not
sent) so the demo report can show input, output and truth side by side.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from pydicom import Dataset, dcmread
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage

from gateway.contract import derived_uid

__all__ = ["TRUTH_FILE", "preview", "write_lowfield_series"]

TRUTH_FILE = "truth_3t.npz"


def write_lowfield_series(
    folder: Path,
    seed: int = 0,
    *,
    field_t: float = 0.064,
    contrast: str = "T1w",
    matrix: tuple[int, int] = (112, 104),
    slices: Sequence[int] = tuple(range(60, 100, 8)),
    field_strength_attribute: bool = True,
) -> list[Path]:
    """Write a low-field axial brain series; returns the DICOM paths (slice order).

    The 3 T truth of the same slices goes into ``folder / TRUTH_FILE`` (never
    sent) for :func:`preview`. ``field_strength_attribute=False`` leaves out
    MagneticFieldStrength, to exercise ``assume_field_t``.
    """
    from pipelines.lf2hf.lab.simulator import simulate_series

    folder.mkdir(parents=True, exist_ok=True)
    sim = simulate_series(list(slices), matrix, field_t, contrast, seed)
    np.savez_compressed(folder / TRUTH_FILE, target=sim.target, mask=sim.brain_mask)
    study = derived_uid("lf2hf-phantom", seed, "study")
    series = derived_uid("lf2hf-phantom", seed, "series", field_t, contrast)
    frame_of_ref = derived_uid("lf2hf-phantom", seed, "for")
    scale = 4000.0 / max(float(np.percentile(sim.input, 99.5)), 1e-6)  # into a 12-bit range
    rows, cols = matrix
    sr, sc = sim.pixel_spacing_mm
    seq = sim.acquisition.sequence
    paths = []
    for k, (img, z) in enumerate(zip(sim.input, sim.slice_positions_mm)):
        ds = Dataset()
        ds.PatientName = "LOWFIELD^PHANTOM"
        ds.PatientID = f"LF{seed:05d}"
        ds.PatientBirthDate = "19800101"
        ds.PatientSex = "O"
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame_of_ref
        ds.SOPClassUID = MRImageStorage
        ds.SOPInstanceUID = derived_uid(series, "instance", k)
        ds.StudyDate = ds.SeriesDate = ds.ContentDate = "20260101"
        ds.StudyTime = ds.SeriesTime = ds.ContentTime = "090000"
        ds.StudyID, ds.AccessionNumber, ds.ReferringPhysicianName = "1", f"LF{seed:05d}", ""
        ds.Modality = "MR"
        ds.Manufacturer = "aigw synthetic"
        ds.ManufacturerModelName = "low-field simulator"
        ds.SeriesNumber = 3
        ds.SeriesDescription = f"AX {contrast.upper()} SE {field_t:g}T"
        ds.BodyPartExamined = "HEAD"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "M", "NONE"]
        if field_strength_attribute:
            ds.MagneticFieldStrength = f"{field_t:g}"
        ds.ScanningSequence = "SE"
        ds.SequenceVariant = "NONE"
        ds.ScanOptions = ""
        ds.MRAcquisitionType = "2D"
        ds.RepetitionTime = f"{seq.tr_ms:.1f}"
        ds.EchoTime = f"{seq.te_ms:.1f}"
        ds.EchoTrainLength = 1
        ds.ImagedNucleus = "1H"
        ds.SliceThickness = f"{sim.slice_thickness_mm:.3g}"
        ds.PatientPosition = "HFS"
        ds.PositionReferenceIndicator = ""
        ds.InstanceNumber = k + 1
        # Axial, rows along -y (anterior to posterior), columns along +x.
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.ImagePositionPatient = [f"{-sc * (cols - 1) / 2:.4f}", f"{-sr * (rows - 1) / 2:.4f}", f"{float(z):.4f}"]
        ds.PixelSpacing = [f"{sr:.6g}", f"{sc:.6g}"]
        ds.SliceLocation = f"{float(z):.4f}"
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows, ds.Columns = rows, cols
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.PixelData = np.clip(np.rint(img * scale), 0, 4095).astype("<u2").tobytes()
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = ds.SOPClassUID
        meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta = meta
        path = folder / f"lowfield_{k:03d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def _gray(arr: np.ndarray, size: int = 256) -> Image.Image:
    """A square 8-bit picture of ``arr`` windowed to its 1st to 99.5th percentile."""
    lo, hi = np.percentile(arr, [1, 99.5]) if arr.size else (0.0, 1.0)
    x = np.clip((arr - lo) / ((hi - lo) or 1.0), 0, 1)
    return Image.fromarray((x * 255).astype(np.uint8)).resize((size, size), Image.Resampling.BICUBIC)


def preview(inputs: Sequence[Path], outputs: Sequence[Path]) -> list[tuple[str, Any]]:
    """Middle slice: low-field input, AI-enhanced output and (for demo data) the 3 T truth."""
    pictures: list[tuple[str, Any]] = []
    if inputs:
        mid_in = sorted(inputs)[len(inputs) // 2]
        ds = dcmread(mid_in)
        pictures.append((f"low-field input {ds.get('MagneticFieldStrength', '?')} T, {ds.Rows}x{ds.Columns}",
                         _gray(ds.pixel_array.astype(float))))
    outs = sorted((dcmread(p, stop_before_pixels=True).InstanceNumber, p) for p in outputs)
    mid_index = len(outs) // 2
    if outs:
        ds = dcmread(outs[mid_index][1])
        pictures.append((f"AI-enhanced output {ds.Rows}x{ds.Columns}", _gray(ds.pixel_array.astype(float))))
    truth = inputs[0].parent / TRUTH_FILE if inputs else None
    if truth is not None and truth.exists():
        target = np.load(truth)["target"]
        pictures.append(("3 T truth (simulated, not sent)", _gray(target[min(mid_index, len(target) - 1)])))
    return pictures
