"""Common TransformerBlock wiring mistakes (notebook 04), written on the reference part."""

from gpt2_course.checks.core import Mistake
from gpt2_course.reference_parts.block import TransformerBlock


class PostLN(TransformerBlock):
    def forward(self, resid_pre):
        resid_mid = self.ln1(resid_pre + self.attn(resid_pre))
        return self.ln2(resid_mid + self.mlp(resid_mid))


class NoAttnResidual(TransformerBlock):
    def forward(self, resid_pre):
        resid_mid = self.attn(self.ln1(resid_pre))
        return resid_mid + self.mlp(self.ln2(resid_mid))


class NoMlpResidual(TransformerBlock):
    def forward(self, resid_pre):
        resid_mid = resid_pre + self.attn(self.ln1(resid_pre))
        return self.mlp(self.ln2(resid_mid))


class SharedLN(TransformerBlock):
    def forward(self, resid_pre):
        resid_mid = resid_pre + self.attn(self.ln1(resid_pre))
        return resid_mid + self.mlp(self.ln1(resid_mid))


class ResidualOfNormalised(TransformerBlock):
    def forward(self, resid_pre):
        x = self.ln1(resid_pre)
        x = x + self.attn(x)
        x = self.ln2(x)
        return x + self.mlp(x)


class Parallel(TransformerBlock):
    def forward(self, resid_pre):
        return resid_pre + self.attn(self.ln1(resid_pre)) + self.mlp(self.ln2(resid_pre))


class MlpFirst(TransformerBlock):
    def forward(self, resid_pre):
        resid_mid = resid_pre + self.mlp(self.ln2(resid_pre))
        return resid_mid + self.attn(self.ln1(resid_mid))


# fmt: off
MISTAKES = {
    "block.TransformerBlock": [
        Mistake("post_ln", "a post-LN block (LayerNorm after each residual addition, as in the original Transformer); GPT-2 normalises the input of each sublayer instead", PostLN),
        Mistake("no_attn_residual", "a block without the first residual connection (resid_mid = attn(ln1(resid_pre)))", NoAttnResidual),
        Mistake("no_mlp_residual", "a block without the second residual connection (resid_post = mlp(ln2(resid_mid)))", NoMlpResidual),
        Mistake("shared_ln", "a block that uses ln1 before the MLP as well (ln2 is never used)", SharedLN),
        Mistake("residual_of_normalised", "a block that overwrites the residual stream with its normalised copy (x = ln1(x); x = x + attn(x)): the residuals must add to the unnormalised stream", ResidualOfNormalised),
        Mistake("parallel", "a parallel block (the MLP reads resid_pre, not resid_mid, as in GPT-J)", Parallel),
        Mistake("mlp_first", "a block that runs the MLP before the attention", MlpFirst),
    ]
}
# fmt: on
