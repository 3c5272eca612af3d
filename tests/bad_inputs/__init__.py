"""The bad-input catalogue: every input a user can get wrong, each with the whole contract of its rejection
(`catalogue.py`), plus fuzzing of the parsers and the isolation and secret checks."""
