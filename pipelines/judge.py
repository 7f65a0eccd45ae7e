"""The pairwise VLM judge of the paper's Appendix B.4: two images of one (prompt, seed), A/B order
randomised per pair, a JSON verdict parsed strictly, win / tie / loss rates.

A judge is any callable ``judge(image_a, image_b, text) -> str``: two [3, H, W] float images in [0, 1]
and the judge prompt in, the judge's raw answer out. ``load_judge`` builds one from

- a transformers vision-language model id or folder (Qwen3-VL, Qwen2.5-VL, ...): ``TransformersJudge``;
- a server URL ``http://host:port/judge``: ``RemoteJudge`` (``python -m pipelines.judge`` serves one);
- ``path/to/file.py:function`` or ``package.module:function`` (stand-ins, other services).

Serve a large judge on its own GPU (the reward server's conventions: 127.0.0.1 unless --host, an
optional shared token, JSON and PNG only):

    python -m pipelines.judge --judge Qwen/Qwen3-VL-8B-Instruct --port 8001
    python -m pipelines.evaluate ... --judge http://127.0.0.1:8001/judge

POST /judge with ``{"prompt": text, "images": [base64 PNG A, base64 PNG B]}`` answers ``{"answer": text}``.
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import json
import os
import re
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import torch

from pipelines import flags
from pipelines.rewards import is_url, load_custom_reward
from pipelines.rewards.remote import TOKEN_ENV, decode_png, encode_png

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


class RemoteJudge:
    """A judge served over HTTP (``python -m pipelines.judge``): POST ``{"prompt", "images"}``, read ``answer``.
    Connection failures and 5xx answers are retried ``retries`` times with backoff."""

    def __init__(self, url: str, token: str | None = None, timeout: float = 300.0, retries: int = 2):
        self.url, self.timeout, self.retries = url, timeout, retries
        self.token = token if token is not None else os.environ.get(TOKEN_ENV)

    def __call__(self, image_a: torch.Tensor, image_b: torch.Tensor, text: str) -> str:
        body = json.dumps({"prompt": text, "images": [encode_png(image_a), encode_png(image_b)]}).encode()
        headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {self.token}"} if self.token else {})}
        for attempt in range(self.retries + 1):
            try:
                request = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    answer = json.loads(response.read()).get("answer")
                if not isinstance(answer, str):
                    raise RuntimeError(f"judge server {self.url} answered without an 'answer' string")
                return answer
            except urllib.error.HTTPError as error:
                if error.code < 500 or attempt == self.retries:
                    raise RuntimeError(f"judge server {self.url} answered HTTP {error.code}: "
                                       f"{error.read()[:300].decode(errors='replace')}") from error
            except (urllib.error.URLError, TimeoutError, ConnectionError) as error:
                if attempt == self.retries:
                    raise RuntimeError(f"judge server {self.url} unreachable: {error}") from error
            time.sleep(2**attempt)
        raise AssertionError("unreachable")


def load_judge(spec: str, device="cpu", dtype=torch.float32, max_new_tokens: int = 64):
    """The judge ``spec`` names (see the module docstring)."""
    if is_url(spec):
        return RemoteJudge(spec)
    if ":" in spec and not os.path.exists(spec):
        return load_custom_reward(spec)  # any callable from a file or module (same loader as rewards)
    return TransformersJudge(spec, device=device, dtype=dtype, max_new_tokens=max_new_tokens)


# ---------------------------------------------------------------------------------------------
# The judge server
# ---------------------------------------------------------------------------------------------


def make_handler(judge, token: str | None, max_bytes: int):
    lock = threading.Lock()  # one request on the model at a time

    class Handler(BaseHTTPRequestHandler):
        timeout = 60

        def do_POST(self):  # noqa: N802 (http.server API)
            try:
                status, answer = self.handle_judge()
            except Exception as error:  # noqa: BLE001 - answer rather than drop the connection
                status, answer = 500, {"error": f"{type(error).__name__}: {error}"}
            payload = json.dumps(answer).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def handle_judge(self):
            if self.path.rstrip("/") != "/judge":
                return 404, {"error": "POST /judge"}
            given = self.headers.get("Authorization", "").removeprefix("Bearer ")
            if token is not None and not hmac.compare_digest(given.encode(), token.encode()):
                return 401, {"error": "missing or wrong token"}
            length = int(self.headers.get("Content-Length") or 0)
            if not 0 < length <= max_bytes:
                return 413, {"error": f"request body must be 1..{max_bytes} bytes"}
            try:
                body = json.loads(self.rfile.read(length))
                text, images = body["prompt"], [decode_png(item) for item in body["images"]]
                if not isinstance(text, str) or len(images) != 2:
                    raise ValueError("need a 'prompt' string and two 'images'")
            except Exception as error:  # noqa: BLE001 - the client's error
                return 400, {"error": f"expected {{'prompt': str, 'images': [PNG, PNG]}}: {error}"}
            with lock:
                return 200, {"answer": judge(images[0], images[1], text)}

        def log_message(self, format, *args):  # noqa: A002 - quiet by default
            pass

    return Handler


def serve(judge, host: str = "127.0.0.1", port: int = 8001, token: str | None = None,
          max_bytes: int = 64 * 2**20) -> ThreadingHTTPServer:
    """A started-later server (call ``serve_forever``) answering POST /judge with ``judge``."""
    return ThreadingHTTPServer((host, port), make_handler(judge, token, max_bytes))


def build_parser() -> argparse.ArgumentParser:
    parser = flags.Parser(description="Serve a pairwise image judge over HTTP (POST /judge).",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--judge", required=True, help="transformers VLM id or folder, or file.py:function.")
    parser.add_argument("--host", default="127.0.0.1", help="Address to bind.")
    parser.add_argument("--port", type=flags.port, default=8001, help="Port to listen on.")
    parser.add_argument("--token", default=os.environ.get(TOKEN_ENV), help=f"Shared token (default ${TOKEN_ENV}).")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="Judge device.")
    parser.add_argument("--max_new_tokens", type=flags.positive_int, default=64, help="Longest answer, in tokens.")
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    server = serve(load_judge(args.judge, args.device, max_new_tokens=args.max_new_tokens), args.host, args.port,
                   args.token)
    print(f"judging on http://{args.host}:{server.server_port}/judge", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
