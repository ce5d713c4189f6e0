"""Common sampling mistakes (notebook 07), written on the reference parts and torch."""

from functools import partial

import torch
import torch.nn.functional as F

from gpt2_course.checks.core import Mistake
from gpt2_course.reference_parts.sampling import (
    apply_frequency_penalty,
    apply_top_k,
    apply_top_p,
    beam_step,
    sample_next_token,
)

NEG_INF = float("-inf")


def kth(logits, k, largest=True):
    return logits.topk(min(k, logits.shape[-1]), dim=-1, largest=largest).values[..., -1:]


def top_k_exactly_k(logits, k):
    keep = torch.zeros_like(logits, dtype=torch.bool)
    keep.scatter_(-1, logits.topk(min(k, logits.shape[-1]), dim=-1).indices, True)
    return logits.masked_fill(~keep, NEG_INF)


def nucleus(
    logits,
    p,
    *,
    on_probs=True,
    descending=True,
    crossing_stays=True,
    keep_top=True,
    strict_boundary=False,
):
    """Top-p with a switch for each way it goes wrong; as is, it lacks only the special case
    p == 1 (in float32 the running total can reach 1.0 before the last token)."""
    values, order = (logits.softmax(dim=-1) if on_probs else logits).sort(
        dim=-1, descending=descending
    )
    total = values.cumsum(dim=-1)
    before = total - values
    drop = (before > p if strict_boundary else before >= p) if crossing_stays else total > p
    if keep_top:
        drop[..., 0] = False
    return logits.masked_fill(drop.scatter(-1, order, drop), NEG_INF)


def checked_nucleus(logits, p, *, low=0.0, high=1.0, **switches):
    """Right top-p (p = 1 included) but for the switches, raising only outside [low, high]."""
    if not low < p <= high:
        raise ValueError(f"top-p needs {low} < p <= {high}")
    return logits.clone() if p == 1 else nucleus(logits, p, **switches)


def ascending_nucleus(logits, p):
    """Hugging Face's formulation (remove where the ascending running total is <= 1 - p)
    without its min_tokens_to_keep: in float32, 1 - 1e-8 is 1.0 and every token can go."""
    probs, order = logits.softmax(dim=-1).sort(dim=-1)
    drop = probs.cumsum(dim=-1) <= 1 - p
    return logits.masked_fill(drop.scatter(-1, order, drop), NEG_INF)


def checked_temperature(logits, temperature, *, allow_negative=False):
    if temperature == 0 or (temperature < 0 and not allow_negative):
        raise ValueError("temperature must be > 0")
    return logits / temperature


def top_k_clamped_short(logits, k):
    k = min(k, logits.shape[-1] - 1)  # an off-by-one clamp: one token short of the vocabulary
    return logits.masked_fill(logits < kth(logits, k), NEG_INF)


def counts(logits, tokens):
    return F.one_hot(tokens, logits.shape[-1]).sum(dim=1).to(logits.dtype)


def penalty_divides(logits, tokens, penalty):
    seen = counts(logits, tokens) > 0  # Hugging Face's repetition penalty
    return torch.where(seen, torch.where(logits > 0, logits / penalty, logits * penalty), logits)


def draw(logits, generator):
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator)[:, 0]


def penalised(logits, frequency_penalty=0.0, generated=None):
    if frequency_penalty and generated is not None and generated.shape[-1] > 0:
        return apply_frequency_penalty(logits, generated, frequency_penalty)
    return logits


def sampler(*order):
    """sample_next_token with its steps in `order` (right: penalty, temperature, top_k, top_p)."""

    def sample(logits, *, temperature=1.0, top_k=None, top_p=None, generator=None, **penalty):
        if temperature == 0:
            return penalised(logits, **penalty).argmax(dim=-1)
        steps = {
            "penalty": lambda x: penalised(x, **penalty),
            "temperature": lambda x: x / temperature,
            "top_k": lambda x: x if top_k is None else apply_top_k(x, top_k),
            "top_p": lambda x: x if top_p is None else apply_top_p(x, top_p),
        }
        for step in order:
            logits = steps[step](logits)
        return draw(logits, generator)

    return sample


def greedy_no_penalty(logits, *, temperature=1.0, **settings):
    if temperature == 0:
        return logits.argmax(dim=-1)
    return sample_next_token(logits, temperature=temperature, **settings)


def zero_divides(logits, *, temperature=1.0, frequency_penalty=0.0, generated=None, **settings):
    logits = penalised(logits, frequency_penalty, generated) / temperature
    return sample_next_token(logits, **settings)


def variant(base, **changes):
    """`base` (a right loop below) with the attributes or steps in `changes` done wrong."""
    return type(base.__name__, (base,), changes)()


class Generate:
    """A right `generate` loop, in steps that the mistakes below get wrong one at a time."""

    def __call__(self, model, tokens, max_new_tokens, *, seed=None, eos_token_id=None, **settings):
        rng = self.generator(seed)
        prompt_len = tokens.shape[1]
        finished = torch.zeros(len(tokens), dtype=torch.bool)
        for _ in range(max_new_tokens):
            logits = self.next_logits(model, tokens)
            generated = self.penalised_tokens(tokens, prompt_len)
            token = sample_next_token(
                logits, generated=generated, generator=rng, **self.settings(settings)
            )
            if eos_token_id is not None and self.uses_eos:
                token = self.after_eos(token, finished, eos_token_id)
                finished = finished | (token == eos_token_id)
            tokens = torch.cat([tokens, token[:, None]], dim=1)
            if self.all_finished_stops and finished.all():
                break
        return tokens

    all_finished_stops = uses_eos = True

    def generator(self, seed):
        return None if seed is None else torch.Generator().manual_seed(seed)

    def next_logits(self, model, tokens):
        return model(tokens)[:, -1]

    def penalised_tokens(self, tokens, prompt_len):
        return tokens[:, prompt_len:]

    def settings(self, settings):
        return settings

    def after_eos(self, token, finished, eos_token_id):
        return token.masked_fill(finished, eos_token_id)


class GlobalSeed(Generate):
    def generator(self, seed):
        if seed is not None:
            torch.manual_seed(seed)


class BeamSearch:
    """Hugging Face's beam search rules, in steps that the mistakes below get wrong."""

    def __call__(
        self,
        model,
        tokens,
        num_beams,
        max_new_tokens,
        *,
        length_penalty=1.0,
        eos_token_id=None,
        early_stopping=False,
    ):
        if len(tokens) != 1 and self.checks_batch:
            raise ValueError("beam_search takes one prompt")
        self.prompt_len, self.length_penalty = tokens.shape[1], length_penalty
        beams, scores = self.start(tokens, num_beams)
        finished = []  # (normalised score, sequence), best first
        for step in range(1, max_new_tokens + 1):
            log_probs = self.log_probs(model(beams)[:, -1, :])
            top_scores, parents, next_tokens = self.candidates(scores, log_probs, num_beams, step)
            running, running_scores = [], []
            for rank, (score, parent, token) in enumerate(
                zip(top_scores, parents.tolist(), next_tokens.tolist(), strict=True)
            ):
                sequence = torch.cat([beams[parent], beams.new_tensor([token])])
                ends = token == eos_token_id or step == max_new_tokens
                ranked = rank < num_beams or not self.finished_within_num_beams
                if ends and ranked and self.keeps_finished(step, max_new_tokens):
                    finished.append((self.normalised(score, step, token == eos_token_id), sequence))
                if (not ends or self.finished_keep_running) and len(running) < num_beams:
                    running.append(sequence)
                    running_scores.append(score)
            finished = sorted(finished, key=lambda h: -h[0].item())
            finished = finished[:num_beams] if self.cuts_finished else finished
            if step == max_new_tokens or not running:
                break
            if self.stops_when_full(early_stopping) and len(finished) >= num_beams:
                break
            beams, scores = torch.stack(running), torch.stack(running_scores)
            if len(finished) >= num_beams and self.stops_early:
                if (
                    self.best_possible(scores.max(), step, max_new_tokens, early_stopping)
                    <= finished[-1][0]
                ):
                    break
        return finished[0][1][None, :]

    finished_keep_running = False
    stops_early = True
    checks_batch = True
    finished_within_num_beams = True
    cuts_finished = True

    def start(self, tokens, num_beams):
        return tokens, torch.zeros(1)

    def log_probs(self, logits):
        return F.log_softmax(logits, dim=-1)

    def candidates(self, scores, log_probs, num_beams, step):
        return beam_step(scores, log_probs, num_beams)

    def normalised(self, score, step, ends_in_eos):
        return score / step**self.length_penalty

    def keeps_finished(self, step, max_new_tokens):
        return True

    def stops_when_full(self, early_stopping):
        return early_stopping is True

    def best_possible(self, best_running, step, max_new_tokens, early_stopping):
        """The best score the best running beam could still finish with (Hugging Face's)."""
        never = early_stopping == "never" and self.length_penalty > 0
        return best_running / (max_new_tokens if never else step) ** self.length_penalty


class PerBeamGreedy(BeamSearch):
    def candidates(self, scores, log_probs, num_beams, step):
        if step == 1:
            return super().candidates(scores, log_probs, num_beams, step)
        best = log_probs.max(dim=-1)
        return scores + best.values, torch.arange(len(scores)), best.indices


def flat_top(scores, log_probs, num_beams, *, added=True, count=2):
    totals = (scores[:, None] + log_probs if added else log_probs).flatten()
    return totals.topk(min(count * num_beams, totals.numel()))


def flat_split(scores, log_probs, num_beams):
    best, index = flat_top(scores, log_probs, num_beams)
    return best, index // log_probs.shape[-1], index % log_probs.shape[-1]


def step_split_swapped(scores, log_probs, num_beams):
    best, index = flat_top(scores, log_probs, num_beams)
    return best, index % log_probs.shape[-1], index // log_probs.shape[-1]


def step_only_num_beams(scores, log_probs, num_beams):
    best, index = flat_top(scores, log_probs, num_beams, count=1)
    return best, index // log_probs.shape[-1], index % log_probs.shape[-1]


def step_scores_not_added(scores, log_probs, num_beams):
    best, index = flat_top(scores, log_probs, num_beams, added=False)
    return best, index // log_probs.shape[-1], index % log_probs.shape[-1]


def step_per_beam(scores, log_probs, num_beams):
    """Each beam's own 2 best tokens, then the best 2 * num_beams of those."""
    own = (scores[:, None] + log_probs).topk(min(2, log_probs.shape[-1]), dim=-1)
    beams = torch.arange(len(scores))[:, None].expand_as(own.indices).flatten()
    best, pick = own.values.flatten().topk(min(2 * num_beams, own.values.numel()))
    return best, beams[pick], own.indices.flatten()[pick]


# fmt: off
MISTAKES = {
    "sampling.apply_temperature": [
        Mistake("multiplied", "logits multiplied by the temperature instead of divided by it", lambda logits, temperature: logits * temperature),
        Mistake("probabilities", "probabilities (a softmax) instead of logits", lambda logits, temperature: (logits / temperature).softmax(dim=-1)),
        Mistake("in_place", "dividing the logits in place (logits /= temperature)", lambda logits, temperature: logits.div_(temperature)),
        Mistake("returns_input_at_one", "returning the input logits themselves when temperature == 1 (the caller's tensor, not a new one)", lambda logits, temperature: logits if temperature == 1 else logits / temperature),
        Mistake("no_validation", "a temperature <= 0 not rejected (divide by 0: inf and NaN; raise a ValueError instead)", lambda logits, temperature: logits / temperature),
        Mistake("negative_allowed", "a negative temperature accepted (it would make the least likely tokens the most likely; raise a ValueError for temperature <= 0)", partial(checked_temperature, allow_negative=True)),
    ],
    "sampling.apply_top_k": [
        Mistake("keeps_k_plus_one", "top-k that keeps k + 1 tokens (an off-by-one at the k-th value)", lambda logits, k: logits.masked_fill(logits < kth(logits, k + 1), NEG_INF)),
        Mistake("ties_dropped", "top-k that keeps exactly k tokens, dropping tokens tied with the k-th largest logit (Hugging Face keeps every token whose logit is >= the k-th largest)", top_k_exactly_k),
        Mistake("smallest", "keeping the k smallest logits instead of the k largest", lambda logits, k: logits.masked_fill(logits > kth(logits, k, largest=False), NEG_INF)),
        Mistake("zero_fill", "removed tokens set to 0 instead of -inf (a logit of 0 still has probability)", lambda logits, k: logits.masked_fill(logits < kth(logits, k), 0.0)),
        Mistake("no_clamp", "k not clamped to the vocabulary size (topk fails when k > d_vocab)", lambda logits, k: logits.masked_fill(logits < logits.topk(k, dim=-1).values[..., -1:], NEG_INF)),
        Mistake("clamped_short", "k clamped to d_vocab - 1 instead of d_vocab (k equal to the vocabulary size must keep every token)", top_k_clamped_short),
        Mistake("returns_input", "returning the input logits themselves when k covers the vocabulary (the caller's tensor, not a new one)", lambda logits, k: logits if k >= logits.shape[-1] else apply_top_k(logits, k)),
        Mistake("no_validation", "k < 1 not rejected with a ValueError", lambda logits, k: logits.masked_fill(logits < kth(logits, k), NEG_INF)),
    ],
    "sampling.apply_top_p": [
        Mistake("drops_crossing_token", "top-p that drops the token whose probability makes the total cross p (keep a token while the mass *before* it is below p)", lambda logits, p: nucleus(logits, p, crossing_stays=False)),
        Mistake("on_logits", "top-p computed on cumulative logits instead of cumulative probabilities (softmax first)", lambda logits, p: nucleus(logits, p, on_probs=False)),
        Mistake("ascending", "top-p that walks from the least likely token up (sort descending)", lambda logits, p: nucleus(logits, p, descending=False, keep_top=False)),
        Mistake("p_one_rounding", "top-p with p=1 removing the least likely tokens: in float32 the running total can reach 1.0 before the last token, so return the logits unchanged when p == 1", nucleus),
        Mistake("threshold", "a probability threshold (remove tokens below 1 - p) instead of a cumulative one", lambda logits, p: logits.masked_fill(logits.softmax(dim=-1) < 1 - p, NEG_INF)),
        Mistake("boundary_keeps_extra", "top-p that keeps one token too many when the running total lands exactly on p (drop a token once the probability before it reaches p: >=, not >)", partial(checked_nucleus, strict_boundary=True)),
        Mistake("ascending_no_keep_top", "top-p on the ascending running total (remove where it is <= 1 - p) without always keeping the most likely token: in float32 1 - 1e-8 is 1.0, and every token goes", ascending_nucleus),
        Mistake("returns_input_at_p_one", "returning the input logits themselves when p == 1 (the caller's tensor, not a new one)", lambda logits, p: logits if p == 1 else nucleus(logits, p)),
        Mistake("no_validation", "p outside (0, 1] not rejected with a ValueError", partial(checked_nucleus, low=float("-inf"), high=float("inf"))),
        Mistake("p_above_one_allowed", "p > 1 accepted (only 0 < p <= 1 is a probability mass; raise a ValueError)", partial(checked_nucleus, high=float("inf"))),
    ],
    "sampling.apply_frequency_penalty": [
        Mistake("wrong_sign", "the penalty added instead of subtracted (repeats become more likely)", lambda logits, tokens, penalty: logits + penalty * counts(logits, tokens)),
        Mistake("presence", "a presence penalty: penalty once per token seen, not once per occurrence", lambda logits, tokens, penalty: logits - penalty * (counts(logits, tokens) > 0).float()),
        Mistake("whole_batch", "occurrences counted over the whole batch instead of per row", lambda logits, tokens, penalty: logits - penalty * torch.bincount(tokens.flatten(), minlength=logits.shape[-1]).to(logits.dtype)),
        Mistake("repetition_penalty", "Hugging Face's repetition penalty (divide positive logits of seen tokens, multiply negative ones) instead of subtracting penalty * count", penalty_divides),
        Mistake("returns_input", "returning the input logits themselves when there is nothing to penalise (penalty 0 or no tokens: the caller's tensor, not a new one)", lambda logits, tokens, penalty: logits if penalty == 0 or tokens.numel() == 0 else apply_frequency_penalty(logits, tokens, penalty)),
    ],
    "sampling.sample_next_token": [
        Mistake("greedy_no_penalty", "temperature 0 returning the argmax of the raw logits, before the frequency penalty", greedy_no_penalty),
        Mistake("zero_divides", "temperature 0 not treated as greedy (dividing by 0 gives inf / NaN probabilities)", zero_divides),
        Mistake("always_greedy", "always the most likely token (argmax) instead of a random draw", lambda logits, *, frequency_penalty=0.0, generated=None, **settings: penalised(logits, frequency_penalty, generated).argmax(dim=-1)),
        Mistake("temperature_multiplied", "logits multiplied by the temperature instead of divided", lambda logits, *, temperature=1.0, **settings: sample_next_token(logits, temperature=1 / temperature if temperature else 0, **settings)),
        Mistake("filters_before_temperature", "top-k / top-p applied before the temperature (top-p must see the tempered probabilities)", sampler("penalty", "top_k", "top_p", "temperature")),
        Mistake("top_p_first", "top-p applied before top-k (Hugging Face applies top-k first)", sampler("penalty", "temperature", "top_p", "top_k")),
        Mistake("generator_ignored", "draws that ignore `generator` (torch's global random state instead: the same seed then gives different text, and generate cannot be reproduced)", lambda logits, *, generator=None, **settings: sample_next_token(logits, **settings)),
        Mistake("penalty_after_temperature", "the frequency penalty applied after the temperature (it must come first, on the raw logits)", sampler("temperature", "top_k", "top_p", "penalty")),
    ],
    "sampling.generate": [
        Mistake("first_position", "the logits of the first position (logits[:, 0]) instead of the last", variant(Generate, next_logits=lambda self, model, tokens: model(tokens)[:, 0])),
        Mistake("finished_rows_continue", "rows that produced eos carrying on with ordinary tokens (a finished row must only get eos)", variant(Generate, after_eos=lambda self, token, finished, eos_token_id: token)),
        Mistake("ignores_eos", "eos_token_id ignored", variant(Generate, uses_eos=False)),
        Mistake("no_early_stop", "generation that goes on to max_new_tokens after every row has finished (stop once all have eos)", variant(Generate, all_finished_stops=False)),
        Mistake("prompt_penalised", "a frequency penalty that counts the prompt's tokens too (only generated tokens count)", variant(Generate, penalised_tokens=lambda self, tokens, prompt_len: tokens)),
        Mistake("seed_ignored", "a seed that is ignored (draws from torch's global random state)", variant(Generate, generator=lambda self, seed: None)),
        Mistake("global_seed", "seeding with torch.manual_seed, which resets torch's global random state", GlobalSeed()),
        Mistake("settings_dropped", "top_k / top_p not passed on to sample_next_token", variant(Generate, settings=lambda self, settings: {k: v for k, v in settings.items() if k not in ("top_k", "top_p")})),
    ],
    "sampling.beam_step": [
        Mistake("per_beam", "each beam's own best tokens ranked separately (2 per beam), not all beams * d_vocab candidates together", step_per_beam),
        Mistake("only_num_beams", "num_beams candidates instead of 2 * num_beams (some of them may end in eos and leave the beams)", step_only_num_beams),
        Mistake("split_swapped", "the flat index split the wrong way round (it is beam = index // d_vocab, token = index % d_vocab)", step_split_swapped),
        Mistake("scores_not_added", "candidates ranked by the token's log-probability alone, without adding the beam's running score", step_scores_not_added),
    ],
    "sampling.beam_search": [
        Mistake("no_length_normalisation", "finished hypotheses ranked by total log-probability, not divided by length ** length_penalty", variant(BeamSearch, normalised=lambda self, score, step, eos: score)),
        Mistake("length_includes_prompt", "a length penalty that counts the prompt (divide by the number of generated tokens only)", variant(BeamSearch, normalised=lambda self, score, step, eos: score / (self.prompt_len + step) ** self.length_penalty)),
        Mistake("length_without_eos", "a length penalty that does not count the eos token (a hypothesis ending in eos has `step` generated tokens, eos included)", variant(BeamSearch, normalised=lambda self, score, step, eos: score / max(step - eos, 1) ** self.length_penalty)),
        Mistake("finished_keep_running", "beams that ended in eos kept running (a finished hypothesis must leave the running beams)", variant(BeamSearch, finished_keep_running=True)),
        Mistake("finished_dropped", "hypotheses that ended in eos thrown away (keep the num_beams best finished ones)", variant(BeamSearch, keeps_finished=lambda self, step, max_new_tokens: step == max_new_tokens)),
        Mistake("ignores_early_stopping", "early_stopping=True treated like False (with True, stop as soon as num_beams hypotheses have finished)", variant(BeamSearch, stops_when_full=lambda self, early_stopping: False)),
        Mistake("never_stops_early", "a search that never stops before max_new_tokens (with early_stopping=False it stops when the best running beam, divided by its length ** length_penalty, cannot beat the worst kept hypothesis)", variant(BeamSearch, stops_early=False)),
        Mistake("prompt_copies", "a search that starts from num_beams copies of the prompt, all scored 0 (start from one beam, the prompt: copies fill the first step's candidates with duplicates)", variant(BeamSearch, start=lambda self, tokens, num_beams: (tokens.repeat(num_beams, 1), torch.zeros(num_beams)))),
        Mistake("only_num_beams_candidates", "num_beams candidates per step instead of 2 * num_beams (when some end in eos, too few beams keep running)", variant(BeamSearch, candidates=lambda self, scores, log_probs, num_beams, step: step_only_num_beams(scores, log_probs, num_beams))),
        Mistake("finished_beyond_num_beams", "eos candidates ranked below the first num_beams kept as finished hypotheses (only the first num_beams candidates may finish)", variant(BeamSearch, finished_within_num_beams=False)),
        Mistake("keeps_every_finished", "every finished hypothesis kept, not only the num_beams best (the stop test compares with the num_beams-th best)", variant(BeamSearch, cuts_finished=False)),
        Mistake("probabilities", "scores that add probabilities (softmax) instead of log-probabilities (log_softmax)", variant(BeamSearch, log_probs=lambda self, logits: logits.softmax(dim=-1))),
        Mistake("stop_test_unnormalised", "a stop test that compares the best running beam's total log-probability, not divided by length ** length_penalty, with the finished hypotheses", variant(BeamSearch, best_possible=lambda self, best, step, max_new_tokens, early_stopping: best)),
        Mistake("never_like_false", "early_stopping='never' treated like False (with 'never', the best running beam could still reach max_new_tokens: divide by max_new_tokens ** length_penalty)", variant(BeamSearch, best_possible=lambda self, best, step, max_new_tokens, early_stopping: best / step**self.length_penalty)),
        Mistake("batch_accepted", "a batch of several prompts accepted (beam_search takes one prompt, [1, seq]: raise a ValueError)", variant(BeamSearch, checks_batch=False)),
        Mistake("no_beam_step", "a beam search that ranks the candidates itself instead of calling beam_step", variant(BeamSearch, candidates=lambda self, scores, log_probs, num_beams, step: flat_split(scores, log_probs, num_beams))),
        Mistake("per_beam_greedy", "each beam extended only by its own best token (num_beams greedy searches), not the best candidates over all beams", PerBeamGreedy()),
    ],
}
# fmt: on
