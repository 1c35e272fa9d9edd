"""Input limits shared by the Python API and the command line (which checks them before loading models)."""

MAX_TEXT_CHARS = 20_000   # longer texts should be split into several memories
MAX_BUDGET_TOKENS = 1_000_000
