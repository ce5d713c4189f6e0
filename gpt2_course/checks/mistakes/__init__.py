"""The mistake libraries: for every check, the common wrong implementations a learner
writes, each as readable code built on the reference parts (never on `solutions/`).

Each module holds `MISTAKES`: check id -> [Mistake(name, what it looks like, code)].
A learner's copy of the course (`gpt2-course release`) leaves this package out and
diagnoses from the fingerprints of these mistakes instead.
"""
