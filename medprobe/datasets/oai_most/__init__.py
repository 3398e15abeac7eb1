"""T8: knee radiographs of OAI and MOST (KL grade 0-4), each knee cropped to 140 mm x 140 mm around the joint.

Access is by data-use agreement: OAI through the NIMH Data Archive (https://nda.nih.gov/oai), MOST through
the NIA (https://agingresearchbiobank.nia.nih.gov). The recipe takes the knees from one or both of these, in
``resources/datasets/oai_most/``:

* ``oai/``: the OAI release as downloaded. The recipe lists every knee and visit itself (:func:`oai_knees`)
  from the X-ray semi-quantitative readings ``kXR_SQ_BU<visit>.txt`` (pipe-separated ASCII release) or
  ``kxr_sq_bu<visit>.sas7bdat`` (SAS release): one row per knee and reading project with ``ID``, ``SIDE``
  (1 = right, 2 = left), ``READPRJ``, ``V<visit>XRKL`` and ``V<visit>BARCDBU`` (the barcode of the radiograph
  read), and from the image archives, each unpacked into a folder named by its visit (``00m``, ``12m``, ...):
  ``contents.csv`` (``Folder``, ``ParticipantID``, ``Barcode``, ``SeriesDescription``, ...) whose rows with
  ``SeriesDescription`` "Bilateral PA Fixed Flexion Knee" are the knee radiographs, a DICOM at ``<Folder>/001``;
* ``knees.csv``, a table the user makes (MOST, whose image folders public code does not link to a ``MOSTID``
  for certain; or everything): columns ``file`` (radiograph, DICOM or PNG, relative to this folder),
  ``patient_id``, ``side`` (``R``/``L``), ``kl`` (0-4), ``source`` (``oai``/``most``), ``partition``
  (``train``/``test``/empty) and, for non-DICOM files, ``spacing_row``/``spacing_col`` in mm per pixel.

The recipe in three steps, one module each: :mod:`~medprobe.datasets.oai_most.release` reads the OAI
release (where its layouts come from is said there), :mod:`~medprobe.datasets.oai_most.knees` lists every knee
and :mod:`~medprobe.datasets.oai_most.raw` crops them into the raw table; :mod:`~medprobe.datasets.oai_most.layout`
names the folder's files and columns.

Rule ``oai_most_files`` (:func:`prepare`) checks which of the two is there (stopping with both options when
neither is), lists every knee in ``knees_all.csv`` (the radiographs KNEEL runs on) and writes the receipt.

Landmarks come from the task's ``landmarks`` setting: ``kneel`` runs the upstream KNEEL models (rule
``kneel_landmarks`` in ``envs/kneel.yaml``, which also lists in ``landmarks_undetected.csv``, ``file, side, reason``,
the knees it found no joint for), a path names the user's own file (``file, side, x, y``, one row per landmark,
pixels of the original image); rule ``raw_dataset`` passes them to :func:`convert`. Without them, the recipe
reads ``landmarks.csv`` next to ``knees.csv``. Knees listed as undetected are left out and counted in
``counts.json``; knees of ``knees.csv`` with neither landmarks nor an undetected entry are taken as ready-made
crops (users who already have crops name them in ``knees.csv`` and give no landmarks for them); knees of the OAI
release without landmarks are left out.
"""

from medprobe.datasets import Dataset, Source, register
from medprobe.datasets.oai_most.knees import knee_table, missing_files_message, prepare
from medprobe.datasets.oai_most.layout import ACCESS, KNEES, LANDMARKS_NOTE, NAME, OAI_DIR, TITLE
from medprobe.datasets.oai_most.raw import convert
from medprobe.datasets.oai_most.release import find_release, oai_knees, read_contents, read_readings

__all__ = [
    "RECIPE",
    "convert",
    "find_release",
    "knee_table",
    "missing_files_message",
    "oai_knees",
    "prepare",
    "read_contents",
    "read_readings",
]

RECIPE = register(
    Dataset(
        name=NAME,
        title=TITLE,
        licence="OAI and MOST data-use agreements (no redistribution)",
        access=ACCESS,
        sources=(
            Source(
                KNEES,
                description="one row per knee: file, patient_id, side, kl, source, partition[, spacing_row, spacing_col]",
            ),
        ),
        convert=convert,
        inputs=("landmarks", "undetected"),
        expected={"total": {"images": 66089}},
        manual_note=f"Instead of (or next to) {KNEES}, the OAI release as downloaded can go below {OAI_DIR}/: the image "
        "archives, each in a folder named by its visit (00m, 12m, ...), and the kXR_SQ_BU<visit>.txt readings; the "
        "workflow (rule oai_most_files) then lists the OAI knees itself. Radiographs named in knees.csv go below the "
        f"same folder. {LANDMARKS_NOTE}",
    )
)
