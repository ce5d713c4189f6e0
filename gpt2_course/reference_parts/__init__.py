"""Reference parts: every component of the course, written on torch's own kernels.

They carry the contract's class names and parameter names, so that they load
GPT-2's weights like the learner's parts. The checks build the sub-parts of a
composite (the LayerNorm, attention and MLP inside a block under test) from
them, and a learner who continues with one component lent (`parts.use_solution`)
gets the reference solution where the course has `solutions/`, and these where
it does not (a learner's copy made by `gpt2-course release`).

They are not the exercises' answers written out: each uses the kernel that
does the job (`F.layer_norm`, `F.scaled_dot_product_attention`, `F.gelu`,
`F.embedding`, `F.cross_entropy`, Hugging Face's logits processors, ...).
"""
