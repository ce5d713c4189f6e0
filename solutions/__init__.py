"""Reference solutions: complete versions of gpt2_course/exercises, file for file."""
