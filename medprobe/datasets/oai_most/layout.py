"""What T8's dataset folder holds: its file names, the columns of ``knees.csv``, where a knee was listed
and why one is left out; and who grants access (the missing-files message and the recipe both say it)."""

NAME = "oai_most"
TITLE = "Osteoarthritis Initiative (OAI) + Multicenter Osteoarthritis Study (MOST)"
ACCESS = (
    "OAI: https://nda.nih.gov/oai (NIMH Data Archive account and data-use certification); MOST: "
    "https://agingresearchbiobank.nia.nih.gov (NIA request)"
)

KNEE_COLUMNS = ["file", "patient_id", "side", "kl", "source", "partition"]
KNEES = "knees.csv"
KNEES_ALL = "knees_all.csv"  # every knee of knees.csv and of the OAI release: what KNEEL runs on
OAI_DIR = "oai"
LANDMARKS = "landmarks.csv"
# Where a row of knees_all.csv was listed (its ``origin`` column)
FROM_KNEES_CSV, FROM_OAI_RELEASE = "knees.csv", "oai release"
# Knees left out of the raw table, counted in counts.json under these reasons
NO_JOINT, NO_LANDMARKS = "no joint found by KNEEL", "OAI: no landmarks"

LANDMARKS_NOTE = (
    "Landmarks come from KNEEL (`landmarks: kneel`) or your own file (`landmarks: <path>`); see docs/datasets.md (T8)."
)
