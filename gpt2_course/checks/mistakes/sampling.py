"""Common sampling mistakes (notebook 07), written on the reference parts and torch."""

import torch
import torch.nn.functional as F

from gpt2_course.checks.core import Mistake
from gpt2_course.reference_parts.sampling import (
    apply_frequency_penalty,
    apply_temperature,
    apply_top_k,
    apply_top_p,
    sample_next_token,
)

NEG_INF = float("-inf")

# --------------------------------------------------------------- apply_temperature


def temperature_in_place(logits, temperature):
    logits /= temperature
    return logits


# --------------------------------------------------------------- apply_top_k


def kth_largest(logits, k):
    return logits.topk(min(k, logits.shape[-1]), dim=-1).values[..., -1:]


def top_k_exactly_k(logits, k):
    keep = torch.zeros_like(logits, dtype=torch.bool)
    keep.scatter_(-1, logits.topk(min(k, logits.shape[-1]), dim=-1).indices, True)
    return logits.masked_fill(~keep, NEG_INF)


def top_k_smallest(logits, k):
    kth = logits.topk(min(k, logits.shape[-1]), dim=-1, largest=False).values[..., -1:]
    return logits.masked_fill(logits > kth, NEG_INF)


def top_k_no_clamp(logits, k):
    kth = logits.topk(k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, NEG_INF)


# --------------------------------------------------------------- apply_top_p


def drop_sorted(logits, drop, order):
    """Remove the tokens that `drop` marks in sorted order."""
    return logits.masked_fill(drop.scatter(-1, order, drop), NEG_INF)


def top_p_drops_crossing(logits, p):
    probs, order = logits.softmax(dim=-1).sort(dim=-1, descending=True)
    drop = probs.cumsum(dim=-1) > p  # the token that crosses p goes too
    drop[..., 0] = False
    return drop_sorted(logits, drop, order)


def top_p_on_logits(logits, p):
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    drop = sorted_logits.cumsum(dim=-1) - sorted_logits >= p  # cumulative logits
    drop[..., 0] = False
    return drop_sorted(logits, drop, order)


def top_p_ascending(logits, p):
    probs, order = logits.softmax(dim=-1).sort(dim=-1)  # least likely first
    return drop_sorted(logits, probs.cumsum(dim=-1) - probs >= p, order)


def top_p_no_special_one(logits, p):
    probs, order = logits.softmax(dim=-1).sort(dim=-1, descending=True)
    drop = probs.cumsum(dim=-1) - probs >= p  # at p=1 float32 rounding can reach 1.0 early
    drop[..., 0] = False
    return drop_sorted(logits, drop, order)


# --------------------------------------------------------------- apply_frequency_penalty


def counts(logits, tokens):
    return F.one_hot(tokens, logits.shape[-1]).sum(dim=1).to(logits.dtype)


def penalty_whole_batch(logits, tokens, penalty):
    batch_counts = torch.bincount(tokens.flatten(), minlength=logits.shape[-1])
    return logits - penalty * batch_counts.to(logits.dtype)


def penalty_divides(logits, tokens, penalty):
    seen = counts(logits, tokens) > 0  # Hugging Face's repetition penalty
    return torch.where(seen, torch.where(logits > 0, logits / penalty, logits * penalty), logits)


# --------------------------------------------------------------- sample_next_token


def draw(logits, generator):
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator)[:, 0]


def penalised(logits, frequency_penalty=0.0, generated=None):
    if frequency_penalty and generated is not None and generated.shape[-1] > 0:
        return apply_frequency_penalty(logits, generated, frequency_penalty)
    return logits


def greedy_no_penalty(logits, *, temperature=1.0, **settings):
    if temperature == 0:
        return logits.argmax(dim=-1)
    return sample_next_token(logits, temperature=temperature, **settings)


def zero_divides(logits, *, temperature=1.0, frequency_penalty=0.0, generated=None, **settings):
    logits = penalised(logits, frequency_penalty, generated) / temperature
    return sample_next_token(logits, **settings)


def always_greedy(logits, *, frequency_penalty=0.0, generated=None, **settings):
    return penalised(logits, frequency_penalty, generated).argmax(dim=-1)


def temperature_multiplied(logits, *, temperature=1.0, **settings):
    # multiplying by t is dividing by 1 / t
    return sample_next_token(logits, temperature=1 / temperature if temperature else 0, **settings)


def filters_before_temperature(
    logits, *, temperature=1.0, top_k=None, top_p=None, generator=None, **penalty
):
    logits = sample_filters(penalised(logits, **penalty), top_k, top_p)
    return logits.argmax(dim=-1) if temperature == 0 else draw(logits / temperature, generator)


def sample_filters(logits, top_k, top_p):
    logits = logits if top_k is None else apply_top_k(logits, top_k)
    return logits if top_p is None else apply_top_p(logits, top_p)


def top_p_first(logits, *, temperature=1.0, top_k=None, top_p=None, generator=None, **penalty):
    logits = penalised(logits, **penalty)
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = apply_temperature(logits, temperature)
    logits = logits if top_p is None else apply_top_p(logits, top_p)
    logits = logits if top_k is None else apply_top_k(logits, top_k)
    return draw(logits, generator)


def penalty_after_temperature(
    logits, *, temperature=1.0, top_k=None, top_p=None, generator=None, **penalty
):
    if temperature == 0:
        return penalised(logits, **penalty).argmax(dim=-1)
    logits = sample_filters(apply_temperature(logits, temperature), top_k, top_p)
    return draw(penalised(logits, **penalty), generator)


# --------------------------------------------------------------- generate


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
            if eos_token_id is not None:
                token = self.after_eos(token, finished, eos_token_id)
                finished = finished | (token == eos_token_id)
            tokens = torch.cat([tokens, token[:, None]], dim=1)
            if self.all_finished_stops and finished.all():
                break
        return tokens

    all_finished_stops = True

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


class FirstPosition(Generate):
    def next_logits(self, model, tokens):
        return model(tokens)[:, 0]


class FinishedRowsContinue(Generate):
    def after_eos(self, token, finished, eos_token_id):
        return token


class IgnoresEos(Generate):
    def __call__(self, model, tokens, max_new_tokens, *, eos_token_id=None, **settings):
        return super().__call__(model, tokens, max_new_tokens, **settings)


class NoEarlyStop(Generate):
    all_finished_stops = False


class PromptPenalised(Generate):
    def penalised_tokens(self, tokens, prompt_len):
        return tokens


class SeedIgnored(Generate):
    def generator(self, seed):
        return None


class GlobalSeed(Generate):
    def generator(self, seed):
        if seed is not None:
            torch.manual_seed(seed)


class SettingsDropped(Generate):
    def settings(self, settings):
        return {k: v for k, v in settings.items() if k not in ("top_k", "top_p")}


# --------------------------------------------------------------- beam_search


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
        self.prompt_len, self.length_penalty = tokens.shape[1], length_penalty
        beams, scores = tokens, torch.zeros(1)
        finished = []  # (normalised score, sequence), best first
        for step in range(1, max_new_tokens + 1):
            log_probs = F.log_softmax(model(beams)[:, -1, :], dim=-1)
            top_scores, parents, next_tokens = self.candidates(scores, log_probs, num_beams, step)
            running, running_scores = [], []
            for rank, (score, parent, token) in enumerate(
                zip(top_scores, parents.tolist(), next_tokens.tolist(), strict=True)
            ):
                sequence = torch.cat([beams[parent], beams.new_tensor([token])])
                ends = token == eos_token_id or step == max_new_tokens
                if ends and rank < num_beams and self.keeps_finished(step, max_new_tokens):
                    finished.append((self.normalised(score, step), sequence))
                if (not ends or self.finished_keep_running) and len(running) < num_beams:
                    running.append(sequence)
                    running_scores.append(score)
            finished = sorted(finished, key=lambda h: -h[0].item())[:num_beams]
            if step == max_new_tokens or not running:
                break
            if self.stops_when_full(early_stopping) and len(finished) == num_beams:
                break
            beams, scores = torch.stack(running), torch.stack(running_scores)
            if len(finished) == num_beams and self.stops_early:
                length = (
                    max_new_tokens if early_stopping == "never" and length_penalty > 0 else step
                )
                if scores.max() / length**length_penalty <= finished[-1][0]:
                    break
        return finished[0][1][None, :]

    finished_keep_running = False
    stops_early = True

    def candidates(self, scores, log_probs, num_beams, step):
        top_scores, index = (scores[:, None] + log_probs).flatten().topk(2 * num_beams)
        return top_scores, index // log_probs.shape[-1], index % log_probs.shape[-1]

    def normalised(self, score, step):
        return score / step**self.length_penalty

    def keeps_finished(self, step, max_new_tokens):
        return True

    def stops_when_full(self, early_stopping):
        return early_stopping is True


class NoLengthNormalisation(BeamSearch):
    def normalised(self, score, step):
        return score


class LengthIncludesPrompt(BeamSearch):
    def normalised(self, score, step):
        return score / (self.prompt_len + step) ** self.length_penalty


class FinishedKeepRunning(BeamSearch):
    finished_keep_running = True


class FinishedDropped(BeamSearch):
    def keeps_finished(self, step, max_new_tokens):
        return step == max_new_tokens  # only hypotheses cut off by the length limit


class IgnoresEarlyStopping(BeamSearch):
    def stops_when_full(self, early_stopping):
        return False


class NeverStopsEarly(BeamSearch):
    stops_early = False


class PerBeamGreedy(BeamSearch):
    def candidates(self, scores, log_probs, num_beams, step):
        if step == 1:
            return super().candidates(scores, log_probs, num_beams, step)
        best = log_probs.max(dim=-1)
        return scores + best.values, torch.arange(len(scores)), best.indices


# fmt: off
MISTAKES = {
    "sampling.apply_temperature": [
        Mistake("multiplied", "logits multiplied by the temperature instead of divided by it", lambda logits, temperature: logits * temperature),
        Mistake("probabilities", "probabilities (a softmax) instead of logits", lambda logits, temperature: (logits / temperature).softmax(dim=-1)),
        Mistake("in_place", "dividing the logits in place (logits /= temperature)", temperature_in_place),
    ],
    "sampling.apply_top_k": [
        Mistake("keeps_k_plus_one", "top-k that keeps k + 1 tokens (an off-by-one at the k-th value)", lambda logits, k: logits.masked_fill(logits < kth_largest(logits, k + 1), NEG_INF)),
        Mistake("ties_dropped", "top-k that keeps exactly k tokens, dropping tokens tied with the k-th largest logit (Hugging Face keeps every token whose logit is >= the k-th largest)", top_k_exactly_k),
        Mistake("smallest", "keeping the k smallest logits instead of the k largest", top_k_smallest),
        Mistake("zero_fill", "removed tokens set to 0 instead of -inf (a logit of 0 still has probability)", lambda logits, k: logits.masked_fill(logits < kth_largest(logits, k), 0.0)),
        Mistake("no_clamp", "k not clamped to the vocabulary size (topk fails when k > d_vocab)", top_k_no_clamp),
    ],
    "sampling.apply_top_p": [
        Mistake("drops_crossing_token", "top-p that drops the token whose probability makes the total cross p (keep a token while the mass *before* it is below p)", top_p_drops_crossing),
        Mistake("on_logits", "top-p computed on cumulative logits instead of cumulative probabilities (softmax first)", top_p_on_logits),
        Mistake("ascending", "top-p that walks from the least likely token up (sort descending)", top_p_ascending),
        Mistake("p_one_rounding", "top-p with p=1 removing the least likely tokens: in float32 the running total can reach 1.0 before the last token, so return the logits unchanged when p == 1", top_p_no_special_one),
        Mistake("threshold", "a probability threshold (remove tokens below 1 - p) instead of a cumulative one", lambda logits, p: logits.masked_fill(logits.softmax(dim=-1) < 1 - p, NEG_INF)),
    ],
    "sampling.apply_frequency_penalty": [
        Mistake("wrong_sign", "the penalty added instead of subtracted (repeats become more likely)", lambda logits, tokens, penalty: logits + penalty * counts(logits, tokens)),
        Mistake("presence", "a presence penalty: penalty once per token seen, not once per occurrence", lambda logits, tokens, penalty: logits - penalty * (counts(logits, tokens) > 0).float()),
        Mistake("whole_batch", "occurrences counted over the whole batch instead of per row", penalty_whole_batch),
        Mistake("repetition_penalty", "Hugging Face's repetition penalty (divide positive logits of seen tokens, multiply negative ones) instead of subtracting penalty * count", penalty_divides),
    ],
    "sampling.sample_next_token": [
        Mistake("greedy_no_penalty", "temperature 0 returning the argmax of the raw logits, before the frequency penalty", greedy_no_penalty),
        Mistake("zero_divides", "temperature 0 not treated as greedy (dividing by 0 gives inf / NaN probabilities)", zero_divides),
        Mistake("always_greedy", "always the most likely token (argmax) instead of a random draw", always_greedy),
        Mistake("temperature_multiplied", "logits multiplied by the temperature instead of divided", temperature_multiplied),
        Mistake("filters_before_temperature", "top-k / top-p applied before the temperature (top-p must see the tempered probabilities)", filters_before_temperature),
        Mistake("top_p_first", "top-p applied before top-k (Hugging Face applies top-k first)", top_p_first),
        Mistake("penalty_after_temperature", "the frequency penalty applied after the temperature (it must come first, on the raw logits)", penalty_after_temperature),
    ],
    "sampling.generate": [
        Mistake("first_position", "the logits of the first position (logits[:, 0]) instead of the last", FirstPosition()),
        Mistake("finished_rows_continue", "rows that produced eos carrying on with ordinary tokens (a finished row must only get eos)", FinishedRowsContinue()),
        Mistake("ignores_eos", "eos_token_id ignored", IgnoresEos()),
        Mistake("no_early_stop", "generation that goes on to max_new_tokens after every row has finished (stop once all have eos)", NoEarlyStop()),
        Mistake("prompt_penalised", "a frequency penalty that counts the prompt's tokens too (only generated tokens count)", PromptPenalised()),
        Mistake("seed_ignored", "a seed that is ignored (draws from torch's global random state)", SeedIgnored()),
        Mistake("global_seed", "seeding with torch.manual_seed, which resets torch's global random state", GlobalSeed()),
        Mistake("settings_dropped", "top_k / top_p not passed on to sample_next_token", SettingsDropped()),
    ],
    "sampling.beam_search": [
        Mistake("no_length_normalisation", "finished hypotheses ranked by total log-probability, not divided by length ** length_penalty", NoLengthNormalisation()),
        Mistake("length_includes_prompt", "a length penalty that counts the prompt (divide by the number of generated tokens only)", LengthIncludesPrompt()),
        Mistake("finished_keep_running", "beams that ended in eos kept running (a finished hypothesis must leave the running beams)", FinishedKeepRunning()),
        Mistake("finished_dropped", "hypotheses that ended in eos thrown away (keep the num_beams best finished ones)", FinishedDropped()),
        Mistake("ignores_early_stopping", "early_stopping=True treated like False (with True, stop as soon as num_beams hypotheses have finished)", IgnoresEarlyStopping()),
        Mistake("never_stops_early", "a search that never stops before max_new_tokens (with early_stopping=False it stops when the best running beam, divided by its length ** length_penalty, cannot beat the worst kept hypothesis)", NeverStopsEarly()),
        Mistake("per_beam_greedy", "each beam extended only by its own best token (num_beams greedy searches), not the best candidates over all beams", PerBeamGreedy()),
    ],
}
# fmt: on
