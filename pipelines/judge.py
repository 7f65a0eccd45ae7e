"""The pairwise VLM judge of the paper's Appendix B.4: two images of one (prompt, seed), A/B order
randomised per pair, a JSON verdict parsed strictly, win / tie / loss rates.

A judge is any callable ``judge(image_a, image_b, text) -> str``: two [3, H, W] float images in [0, 1]
and the judge prompt in, the judge's raw answer out. ``load_judge`` builds one from

- a transformers vision-language model id or folder (Qwen3-VL, Qwen2.5-VL, ...): ``TransformersJudge``;
- ``openai:<base_url>`` with ``--judge_model``: ``OpenAIJudge``, a VLM behind an OpenAI-compatible
  chat-completions API, the way large VLMs are served (on its own GPU):

      vllm serve Qwen/Qwen3-VL-8B-Instruct --port 8000 --limit-mm-per-prompt '{"image": 2}'
      python -m pipelines.evaluate ... --judge openai:http://127.0.0.1:8000/v1 --judge_model Qwen/Qwen3-VL-8B-Instruct

- ``path/to/file.py:function`` or ``package.module:function`` (stand-ins, other services).
"""

from __future__ import annotations

import hashlib
import http.client
import json
import logging
import os
import re
import time
import urllib.error
import urllib.request
from dataclasses import dataclass

import torch

from pipelines.redact import public_text
from pipelines.rewards import is_url, load_custom_reward
from pipelines.rewards.remote import encode_png, post_within

logger = logging.getLogger(__name__)

# The Appendix B.4 template, reconstructed from the paper's text. Normalised from the arXiv text
# extraction: the "{internallinenumbers*}" markers before the rubric items are dropped; the
# extraction's wide gaps (four non-breaking spaces) are paragraph breaks (blank lines) and its
# narrow ones (two) line breaks, so every rubric item, decision rule and the output schema is a line
# of its own; no indentation or trailing space is kept. Every word, the typographic apostrophe of
# "prompt’s" (U+2019) and the schema line are as printed; "{prompt}" is the only placeholder.
JUDGE_PROMPT = '''You are a strict text-to-image judge comparing two generated images.

You will see Image A and Image B. They were generated from the same text prompt.

Text prompt:
"""{prompt}"""

Choose the image that is better as a clean, coherent realization of the prompt.

Rubric, in order:
1. Semantic fidelity: prefer the image where the prompt’s main subject is immediately recognizable and the requested attributes, relations, actions, and scene are correctly expressed.
2. Global coherence: prefer one integrated scene over a collage-like, over-stylized, or visually confused image. Objects should have plausible shape, scale, pose, and spatial relation.
3. Artifact avoidance: strongly penalize malformed bodies, fused objects, duplicated parts, warped geometry, messy textures, unreadable required text, and unnatural distortions.
4. Aesthetic quality: after the above, prefer tasteful lighting, color harmony, composition, and detail. Do not choose an image only because it is sharper, glossier, more saturated, or more dramatic.

Decision rule:
- Major semantic or structural errors should usually lose, even if the image looks polished.
- If both satisfy the text similarly, choose the more coherent and artifact-free image.
- If both are genuinely comparable, answer tie.
- Do not prefer A or B because of position or label.
- Return only valid JSON.

Output schema:
{"winner":"A"|"B"|"tie","confidence":0.0-1.0,"reason":"12 words or fewer"}'''  # noqa: E501


def judge_text(prompt: str) -> str:
    """The judge prompt for one text prompt (a plain substitution: the schema's braces stay)."""
    return JUDGE_PROMPT.replace("{prompt}", prompt)


def shows_candidate_second(seed: int, model: str, prompt: str, image_seed: int) -> bool:
    """Whether the candidate model's image is Image B for this pair: a coin flip seeded by ``seed``
    and the pair itself, so it never depends on how pairs are split across processes."""
    digest = hashlib.sha256(f"{seed}\0{model}\0{prompt}\0{image_seed}".encode()).digest()
    return bool(digest[0] & 1)


@dataclass(frozen=True)
class Verdict:
    winner: str  # "A", "B" or "tie"
    confidence: float | None
    reason: str | None


FENCE = re.compile(r"^```(?:json)?\s*(.*?)\s*```$", re.S | re.I)
WINNERS = {"a": "A", "b": "B", "tie": "tie"}


def parse_verdict(answer: str) -> Verdict | None:
    """The judge's JSON decision, or None when the answer is not one (never guessed).

    Accepted: a JSON object (alone, in a Markdown code fence, or within text) whose ``winner`` is "A",
    "B" or "tie" (any case, surrounding spaces ignored). Unparsed: no decodable object with a
    ``winner``, any other winner value, or several objects naming different winners. ``confidence``
    is kept when it is a number in [0, 1] and ``reason`` when it is a string (else None).
    """
    if not isinstance(answer, str):
        return None
    text = answer.strip()
    fenced = FENCE.match(text)
    text = fenced.group(1) if fenced else text
    decoder, found = json.JSONDecoder(), []
    for start in (m.start() for m in re.finditer(r"\{", text)):
        try:
            value, _ = decoder.raw_decode(text, start)
        except json.JSONDecodeError:
            continue
        if isinstance(value, dict) and "winner" in value:
            found.append(value)
    winners = {WINNERS.get(str(v["winner"]).strip().lower()) if isinstance(v["winner"], str) else None for v in found}
    if len(winners) != 1 or None in winners:
        return None
    first = found[0]
    confidence = first.get("confidence")
    valid = isinstance(confidence, (int, float)) and not isinstance(confidence, bool) and 0 <= confidence <= 1
    reason = first.get("reason")
    return Verdict(winners.pop(), float(confidence) if valid else None, reason if isinstance(reason, str) else None)


def judge_pair(judge, candidate: torch.Tensor, base: torch.Tensor, prompt: str, candidate_second: bool) -> dict:
    """Ask the judge about one pair; the record says which model won (``outcome`` from the candidate's
    side: "win", "tie", "loss", or None when the answer did not parse)."""
    image_a, image_b = (base, candidate) if candidate_second else (candidate, base)
    answer = judge(image_a, image_b, judge_text(prompt))
    verdict = parse_verdict(answer)
    outcome = None
    if verdict is not None:
        candidate_label = "B" if candidate_second else "A"
        outcome = "tie" if verdict.winner == "tie" else ("win" if verdict.winner == candidate_label else "loss")
    return {"candidate_is": "B" if candidate_second else "A", "answer": answer,
            "winner": verdict.winner if verdict else None, "confidence": verdict.confidence if verdict else None,
            "reason": verdict.reason if verdict else None, "outcome": outcome}


OUTCOME_VALUE = {"win": 1.0, "tie": 0.5, "loss": 0.0, None: float("nan")}


def outcome_table(records: list[dict], num_prompts: int, num_seeds: int) -> torch.Tensor:
    """[prompts, seeds] of 1 (win) / 0.5 (tie) / 0 (loss) / NaN (unparsed) from ``judge_pair`` records
    carrying ``prompt_index`` and ``seed_index``."""
    table = torch.full((num_prompts, num_seeds), float("nan"), dtype=torch.float64)
    for record in records:
        table[record["prompt_index"], record["seed_index"]] = OUTCOME_VALUE[record["outcome"]]
    return table


# ---------------------------------------------------------------------------------------------
# Judges
# ---------------------------------------------------------------------------------------------


def to_pil(image: torch.Tensor):
    from PIL import Image

    return Image.fromarray((image.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).cpu().numpy())


class TransformersJudge:
    """A transformers image-text-to-text model (``AutoModelForImageTextToText`` + ``AutoProcessor``).

    One user turn: Image A, Image B, then the judge prompt; the processor's chat template renders it
    (Qwen-VL templates place each image's vision tokens where it appears). Greedy decoding of at most
    ``max_new_tokens`` tokens; the answer is the decoded new tokens.
    """

    def __init__(self, model: str, device="cpu", dtype=torch.float32, max_new_tokens: int = 64):
        from transformers import AutoModelForImageTextToText, AutoProcessor

        self.device = torch.device(device)
        self.processor = AutoProcessor.from_pretrained(model)
        self.model = AutoModelForImageTextToText.from_pretrained(model, dtype=dtype).to(self.device).eval()
        self.max_new_tokens = max_new_tokens

    def messages(self, text: str) -> list[dict]:
        return [{"role": "user", "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": text}]}]

    @torch.no_grad()
    def __call__(self, image_a: torch.Tensor, image_b: torch.Tensor, text: str) -> str:
        chat = self.processor.apply_chat_template(self.messages(text), add_generation_prompt=True, tokenize=False)
        inputs = self.processor(text=[chat], images=[to_pil(image_a), to_pil(image_b)], return_tensors="pt")
        inputs = inputs.to(self.device)
        output = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=False)
        return self.processor.batch_decode(output[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)[0]


OPENAI = "openai:"
API_KEY_ENV = "OPENAI_API_KEY"
RETRIED_STATUSES = {408, 429, 500, 502, 503, 504}


class OpenAIJudge:
    """A VLM served behind an OpenAI-compatible chat-completions API (``vllm serve``, SGLang, a hosted API).

    One user message: Image A and Image B as base64 PNG ``image_url`` parts, then the judge prompt;
    temperature 0 (greedy, as ``TransformersJudge``), at most ``max_tokens`` tokens; the answer is
    ``choices[0].message.content``. The key is read from ``$OPENAI_API_KEY`` (none sent when unset).
    ``deadline`` bounds a whole judgement, retries included: refused connections, timeouts, 408 / 429 /
    5xx are retried with exponential backoff while time is left; any other answer fails at once, naming
    the URL.
    """

    def __init__(self, base_url: str, model: str, deadline: float = 300.0, max_tokens: int = 64,
                 backoff: float = 1.0):
        self.url, self.model = base_url.rstrip("/") + "/chat/completions", model
        self.name = public_text(self.url)
        self.deadline, self.max_tokens, self.backoff = deadline, max_tokens, backoff

    def body(self, image_a: torch.Tensor, image_b: torch.Tensor, text: str) -> bytes:
        parts = [{"type": "image_url", "image_url": {"url": f"data:image/png;base64,{encode_png(image)}"}}
                 for image in (image_a, image_b)]
        message = {"role": "user", "content": parts + [{"type": "text", "text": text}]}
        return json.dumps({"model": self.model, "temperature": 0, "max_tokens": self.max_tokens,
                           "messages": [message]}).encode()

    def __call__(self, image_a: torch.Tensor, image_b: torch.Tensor, text: str) -> str:
        body, headers = self.body(image_a, image_b, text), api_headers()
        give_up, attempt = time.monotonic() + self.deadline, 0
        while True:
            try:
                status, data = post_within(self.url, body, headers, max(give_up - time.monotonic(), 0.001))
            except (OSError, http.client.HTTPException) as error:  # refused, reset, deadline passed
                reason = f"{type(error).__name__}: {error}"
            else:
                if status == 200 or status not in RETRIED_STATUSES:
                    return self.answer_of(status, data)
                reason = f"HTTP {status}"
            delay = self.backoff * 2**attempt
            attempt += 1
            if time.monotonic() + delay >= give_up:
                raise RuntimeError(f"judge {self.name} gave no answer within {self.deadline:g} s (--judge_timeout; "
                                   f"{attempt} attempt{'s' * (attempt > 1)}, last: {reason})")
            time.sleep(delay)

    def answer_of(self, status: int, data: bytes) -> str:
        """The answer text of a complete response, or a ``RuntimeError`` naming the judge's URL."""
        shown = data[:300].decode(errors="replace")
        if status != 200:
            raise RuntimeError(f"judge {self.name} answered HTTP {status}: {shown}")
        try:
            content = json.loads(data)["choices"][0]["message"]["content"]
        except json.JSONDecodeError:
            raise RuntimeError(f"judge {self.name} did not answer JSON (is it an OpenAI-compatible API?): "
                               f"{shown!r}") from None
        except (KeyError, IndexError, TypeError):
            raise RuntimeError(f"judge {self.name} answered without choices[0].message.content: {shown}") from None
        if content is None:  # no text (a refusal, or max_tokens spent on reasoning): counted as unparsed
            return ""
        if not isinstance(content, str):
            raise RuntimeError(f"judge {self.name} answered a non-text message content: {shown}")
        return content


def api_headers() -> dict:
    key = os.environ.get(API_KEY_ENV)
    return {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}


def probe_openai_judge(base_url: str, model: str, timeout: float = 10.0) -> None:
    """GET ``<base_url>/models`` before any image is generated: a judge that is down, refuses the key or
    does not serve ``model`` stops the evaluation with a ``ValueError`` naming it."""
    name = public_text(base_url)
    try:
        with urllib.request.urlopen(urllib.request.Request(base_url.rstrip("/") + "/models", headers=api_headers()),
                                    timeout=timeout) as response:
            listing = json.loads(response.read())
    except urllib.error.HTTPError as error:
        if error.code in (404, 405, 501):  # a compatible server without the model list: left to the first call
            logger.warning("judge %s has no GET /models (HTTP %d): --judge_model not checked", name, error.code)
            return
        hint = f" (set ${API_KEY_ENV})" if error.code == 401 else ""
        raise ValueError(f"judge {name} answered HTTP {error.code} to GET /models{hint}") from None
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"judge {name} is not reachable as an OpenAI-compatible API ({type(error).__name__}: "
                         f"{error}); start it first (vllm serve ...) or fix the URL") from None
    served = [entry.get("id") for entry in listing.get("data", []) if isinstance(entry, dict)] \
        if isinstance(listing, dict) else []
    if model not in served:
        raise ValueError(f"judge {name} does not serve --judge_model {model!r}; it serves: "
                         f"{', '.join(map(str, served))}")


def check_judge(spec: str | None, model: str | None) -> None:
    """The judge flags checked at start-up (``--judge openai:<url>`` needs ``--judge_model``; the server is
    probed); the removed judge server's plain URLs are refused with the replacement."""
    if spec is None:
        if model is not None:
            raise ValueError("--judge_model names the served model of --judge openai:<url>: give --judge")
        return
    if is_url(spec):
        raise ValueError(f"--judge {public_text(spec)}: serve the judge behind an OpenAI-compatible API "
                         "(vllm serve <model>) and pass --judge openai:http://host:port/v1 --judge_model <model>")
    if spec.startswith(OPENAI):
        if not is_url(spec[len(OPENAI):]) or not model:
            raise ValueError("--judge openai:<base_url> needs an http(s) base URL (e.g. "
                             "openai:http://127.0.0.1:8000/v1) and --judge_model, the name the server serves")
        probe_openai_judge(spec[len(OPENAI):], model)
    elif model is not None:
        raise ValueError("--judge_model applies to --judge openai:<url> only")


def load_judge(spec: str, model: str | None = None, device="cpu", dtype=torch.float32, max_new_tokens: int = 64,
               deadline: float = 300.0):
    """The judge ``spec`` names (see the module docstring)."""
    if spec.startswith(OPENAI):
        return OpenAIJudge(spec[len(OPENAI):], model, deadline=deadline, max_tokens=max_new_tokens)
    if ":" in spec and not os.path.exists(spec):
        return load_custom_reward(spec)  # any callable from a file or module (same loader as rewards)
    return TransformersJudge(spec, device=device, dtype=dtype, max_new_tokens=max_new_tokens)
