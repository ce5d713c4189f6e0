"""Your code: complete the stubs in these files, one topic per notebook."""
