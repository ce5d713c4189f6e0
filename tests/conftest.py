"""Tests run fully offline, against a private cache folder."""

import os
import tempfile

# Set before anything imports gpt2_course: no network, ever, in tests.
os.environ["GPT2_COURSE_OFFLINE"] = "1"
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("GPT2_COURSE_CACHE", tempfile.mkdtemp(prefix="gpt2-course-test-cache-"))
os.environ.pop("GPT2_COURSE_SOLUTIONS", None)
