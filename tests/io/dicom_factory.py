"""A bare DICOM instance for tests that write their own series: file meta and identity set, the rest to the caller."""

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid


def new_instance(sop_class: str, modality: str, series_uid: str, instance_number: int | None = None) -> Dataset:
    """An Explicit VR Little Endian dataset of ``sop_class`` with a fresh SOP instance UID in ``series_uid``."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, ds.file_meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.SeriesInstanceUID = modality, series_uid
    if instance_number is not None:
        ds.InstanceNumber = instance_number
    return ds
