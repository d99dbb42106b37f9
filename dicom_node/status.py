"""The DIMSE status codes the node answers with (PS3.7 Annex C, PS3.4 B.2.3, C.4.1.1.4,
C.4.2.1.5, C.4.3.1.4, F.7.2), taken from pynetdicom's ``Status`` where it names them.

pynetdicom names only a few codes (``pynetdicom.status.Status``); the others are codes of its
per-service status tables (``STORAGE_SERVICE_CLASS_STATUS``, ``QR_*_SERVICE_CLASS_STATUS``),
which ``tests/test_pynetdicom_patches.py`` holds these to: same code, same category.
"""

from __future__ import annotations

from pynetdicom.status import Status

# --- every service (PS3.7 C.1, C.2, C.3) ----------------------------------------------------
STATUS_SUCCESS = int(Status.SUCCESS)  # 0x0000
STATUS_CANCEL = int(Status.CANCEL)  # 0xFE00: terminated by a C-CANCEL
STATUS_PENDING = int(Status.PENDING)  # 0xFF00: matches or sub-operations are continuing
STATUS_PROCESSING_FAILURE = 0x0110
STATUS_DUPLICATE_SOP_INSTANCE = 0x0111
STATUS_REFUSED_SOP_CLASS_NOT_SUPPORTED = 0x0122
#: "Refused: Not Authorized" (PS3.7 Annex C.5): the calling AE may not use the service
#: (dicom_node/access.py).
STATUS_REFUSED_NOT_AUTHORIZED = 0x0124

# --- Storage (PS3.4 B.2.3) ------------------------------------------------------------------
STATUS_OUT_OF_RESOURCES = 0xA700
STATUS_DATASET_MISMATCH = 0xA900  # data set does not match SOP class
STATUS_CANNOT_UNDERSTAND = 0xC000
#: Warning "Data Set does not match SOP Class": stored as sent, with an Error Comment saying what
#: does not match (native pixel data longer than its attributes need).
STATUS_WARNING_DATASET_MISMATCH = 0xB007

# --- Query/Retrieve (PS3.4 C.4.1.1.4, C.4.2.1.5, C.4.3.1.4) ---------------------------------
STATUS_PENDING_OPTIONAL_KEYS_UNSUPPORTED = 0xFF01
STATUS_IDENTIFIER_MISMATCH = 0xA900  # identifier does not match SOP class
STATUS_UNABLE_TO_PROCESS = 0xC000
STATUS_OUT_OF_RESOURCES_MATCHES = 0xA701  # unable to calculate number of matches
STATUS_OUT_OF_RESOURCES_SUBOPERATIONS = 0xA702  # unable to perform sub-operations
STATUS_MOVE_DESTINATION_UNKNOWN = int(Status.MOVE_DESTINATION_UNKNOWN)  # 0xA801

# --- Modality Performed Procedure Step, N-CREATE / N-SET / N-GET (PS3.4 F.7.2, F.8.2, PS3.7 C)
STATUS_INVALID_ATTRIBUTE_VALUE = 0x0106
STATUS_NO_SUCH_OBJECT_INSTANCE = 0x0112
STATUS_MISSING_ATTRIBUTE = 0x0120
STATUS_MISSING_ATTRIBUTE_VALUE = 0x0121
STATUS_UNRECOGNIZED_OPERATION = 0x0211  # an operation the SOP Class does not have (PS3.7 C)

#: Each code above, the pynetdicom status table of the service it is answered in, and the
#: category PS3.4 gives it there (checked against pynetdicom by the tests).
CATEGORIES: dict[str, tuple[int, str, str]] = {
    "STATUS_SUCCESS": (STATUS_SUCCESS, "STORAGE_SERVICE_CLASS_STATUS", "Success"),
    "STATUS_CANCEL": (STATUS_CANCEL, "QR_FIND_SERVICE_CLASS_STATUS", "Cancel"),
    "STATUS_PENDING": (STATUS_PENDING, "QR_GET_SERVICE_CLASS_STATUS", "Pending"),
    "STATUS_PROCESSING_FAILURE": (
        STATUS_PROCESSING_FAILURE,
        "STORAGE_SERVICE_CLASS_STATUS",
        "Failure",
    ),
    "STATUS_DUPLICATE_SOP_INSTANCE": (
        STATUS_DUPLICATE_SOP_INSTANCE,
        "STORAGE_SERVICE_CLASS_STATUS",
        "Failure",
    ),
    "STATUS_REFUSED_SOP_CLASS_NOT_SUPPORTED": (
        STATUS_REFUSED_SOP_CLASS_NOT_SUPPORTED,
        "STORAGE_SERVICE_CLASS_STATUS",
        "Failure",
    ),
    "STATUS_REFUSED_NOT_AUTHORIZED": (
        STATUS_REFUSED_NOT_AUTHORIZED,
        "QR_FIND_SERVICE_CLASS_STATUS",
        "Failure",
    ),
    "STATUS_OUT_OF_RESOURCES": (
        STATUS_OUT_OF_RESOURCES,
        "STORAGE_SERVICE_CLASS_STATUS",
        "Failure",
    ),
    "STATUS_DATASET_MISMATCH": (
        STATUS_DATASET_MISMATCH,
        "STORAGE_SERVICE_CLASS_STATUS",
        "Failure",
    ),
    "STATUS_CANNOT_UNDERSTAND": (
        STATUS_CANNOT_UNDERSTAND,
        "STORAGE_SERVICE_CLASS_STATUS",
        "Failure",
    ),
    "STATUS_WARNING_DATASET_MISMATCH": (
        STATUS_WARNING_DATASET_MISMATCH,
        "STORAGE_SERVICE_CLASS_STATUS",
        "Warning",
    ),
    "STATUS_PENDING_OPTIONAL_KEYS_UNSUPPORTED": (
        STATUS_PENDING_OPTIONAL_KEYS_UNSUPPORTED,
        "QR_FIND_SERVICE_CLASS_STATUS",
        "Pending",
    ),
    "STATUS_IDENTIFIER_MISMATCH": (
        STATUS_IDENTIFIER_MISMATCH,
        "QR_FIND_SERVICE_CLASS_STATUS",
        "Failure",
    ),
    "STATUS_UNABLE_TO_PROCESS": (
        STATUS_UNABLE_TO_PROCESS,
        "QR_FIND_SERVICE_CLASS_STATUS",
        "Failure",
    ),
    "STATUS_OUT_OF_RESOURCES_MATCHES": (
        STATUS_OUT_OF_RESOURCES_MATCHES,
        "QR_MOVE_SERVICE_CLASS_STATUS",
        "Failure",
    ),
    "STATUS_OUT_OF_RESOURCES_SUBOPERATIONS": (
        STATUS_OUT_OF_RESOURCES_SUBOPERATIONS,
        "QR_GET_SERVICE_CLASS_STATUS",
        "Failure",
    ),
    "STATUS_MOVE_DESTINATION_UNKNOWN": (
        STATUS_MOVE_DESTINATION_UNKNOWN,
        "QR_MOVE_SERVICE_CLASS_STATUS",
        "Failure",
    ),
    "STATUS_INVALID_ATTRIBUTE_VALUE": (
        STATUS_INVALID_ATTRIBUTE_VALUE,
        "PROCEDURE_STEP_STATUS",
        "Failure",
    ),
    "STATUS_NO_SUCH_OBJECT_INSTANCE": (
        STATUS_NO_SUCH_OBJECT_INSTANCE,
        "PROCEDURE_STEP_STATUS",
        "Failure",
    ),
    "STATUS_MISSING_ATTRIBUTE": (STATUS_MISSING_ATTRIBUTE, "PROCEDURE_STEP_STATUS", "Failure"),
    "STATUS_MISSING_ATTRIBUTE_VALUE": (
        STATUS_MISSING_ATTRIBUTE_VALUE,
        "PROCEDURE_STEP_STATUS",
        "Failure",
    ),
    "STATUS_UNRECOGNIZED_OPERATION": (
        STATUS_UNRECOGNIZED_OPERATION,
        "PROCEDURE_STEP_STATUS",
        "Failure",
    ),
}
