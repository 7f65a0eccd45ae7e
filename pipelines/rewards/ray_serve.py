"""The reward server across machines: Ray Serve replicas of any reward (one per GPU), requests from every
trainer rank batched per replica. Same /score, /health and /info protocol, token and limits as
``python -m pipelines.rewards.server`` (the one-machine server); needs ``pip install "ray[serve]"``.

    python -m pipelines.rewards.ray_serve --reward pickscore --num_replicas 2           # one machine
    ray start --head --port 6379                                                         # a cluster: head node
    ray start --address HEAD:6379                                                        # ... each GPU node
    python -m pipelines.rewards.ray_serve --address auto --reward pickscore --num_replicas 8 --gpus_per_replica 1 \\
        --host 0.0.0.0 --token s3cret                                                    # on the head node
    DRPO_REWARD_TOKEN=s3cret accelerate launch train_drpo.py ... --reward http://HEAD:8000/score

Each replica gathers the requests that reach it within --batch_wait_s (up to --max_batch_requests of them) and
scores their images in one reward call (one per image size), so small requests from many ranks fill the
GPU; every batch is appended to --batch_log (replica, requests, images) when given.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import threading

from pipelines import flags
from pipelines.rewards.remote import TOKEN_ENV
from pipelines.rewards.server import ServerLimits, answer, decode_batch, server_info


def score_together(reward_fn, reward_name: str, requests: list[tuple]) -> list[list[float]]:
    """The scores of several requests' ([N, 3, H, W] images, prompts), one reward call per image size."""
    import torch

    from pipelines.rewards import score_candidates

    answers: list = [None] * len(requests)
    for shape in {tuple(images.shape[1:]) for images, _ in requests}:
        members = [i for i, (images, _) in enumerate(requests) if tuple(images.shape[1:]) == shape]
        images = torch.cat([requests[i][0] for i in members])
        prompts = [prompt for i in members for prompt in requests[i][1]]
        scores = score_candidates(reward_fn, images, prompts, reward_name).ranking.tolist()
        for i in members:
            count = len(requests[i][1])
            answers[i], scores = scores[:count], scores[count:]
    return answers


def build_application(reward: str, token: str | None, limits: ServerLimits, num_replicas: int,
                      cpus_per_replica: float, gpus_per_replica: float, max_batch_requests: int,
                      batch_wait_s: float, batch_log: str | None):
    """The Ray Serve application: ``num_replicas`` copies of the reward behind Serve's HTTP proxy."""
    from ray import serve
    from starlette.concurrency import run_in_threadpool

    @serve.deployment(num_replicas=num_replicas, max_ongoing_requests=limits.max_connections,
                      max_queued_requests=limits.max_queued,
                      ray_actor_options={"num_cpus": cpus_per_replica, "num_gpus": gpus_per_replica})
    class RewardReplica:
        def __init__(self):
            from pipelines.rewards import load_reward

            self.reward_fn = load_reward(reward, device="cuda" if gpus_per_replica else "cpu")
            self.info = server_info(reward, limits, replicas=num_replicas, max_batch_requests=max_batch_requests)

        @serve.batch(max_batch_size=max_batch_requests, batch_wait_timeout_s=batch_wait_s)
        async def score_batch(self, requests: list[tuple]) -> list[list[float]]:
            answers = await run_in_threadpool(score_together, self.reward_fn, reward, requests)
            if batch_log:
                with open(batch_log, "a", encoding="utf-8") as handle:
                    handle.write(json.dumps({"replica": os.getpid(), "requests": len(requests),
                                             "images": sum(len(prompts) for _, prompts in requests)}) + "\n")
            return answers

        async def score(self, prompts: list[str], encoded: list[str]) -> list[float]:
            images = await run_in_threadpool(decode_batch, encoded, limits)
            return await self.score_batch((images, prompts))

        async def __call__(self, request):
            return await answer(request, token, limits, self.info, self.score)

    return RewardReplica.bind()


def build_parser() -> argparse.ArgumentParser:
    from pipelines.rewards.server import build_parser as server_parser

    parser = flags.Parser(description=__doc__.splitlines()[0], parents=[server_parser(add_help=False)],
                          conflict_handler="resolve")
    parser.add_argument("--address", default=None,
                        help="Ray cluster to join (auto: the one `ray start` made on this node); default: a local one.")
    parser.add_argument("--num_replicas", type=flags.positive_int, default=1, help="Copies of the reward.")
    parser.add_argument("--gpus_per_replica", type=float, default=0.0, help="GPUs per replica (1: one GPU each).")
    parser.add_argument("--cpus_per_replica", type=float, default=1.0, help="CPUs Ray reserves per replica.")
    parser.add_argument("--max_batch_requests", type=flags.positive_int, default=8,
                        help="Most requests a replica scores in one reward call.")
    parser.add_argument("--batch_wait_s", type=flags.positive_float, default=0.05,
                        help="How long a replica waits for more requests before scoring a batch.")
    parser.add_argument("--batch_log", default=None, help="Append one JSON line per scored batch to this file.")
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    token = args.token or os.environ.get(TOKEN_ENV) or None
    if args.host not in ("127.0.0.1", "localhost", "::1") and not token:
        raise SystemExit(f"error: serving on {args.host!r} (beyond loopback) needs a shared --token or ${TOKEN_ENV}")
    import ray
    from ray import serve

    limits = ServerLimits(int(args.max_request_mb * 2**20), args.max_batch, args.max_image_pixels,
                          args.max_request_pixels, args.request_timeout, args.max_connections, args.max_queued)
    ray.init(address=args.address, include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": args.host, "port": args.port})
    serve.run(build_application(args.reward, token, limits, args.num_replicas, args.cpus_per_replica,
                                args.gpus_per_replica, args.max_batch_requests, args.batch_wait_s, args.batch_log),
              name="drpo-reward", route_prefix="/")
    print(f"serving reward {args.reward!r} on http://{args.host}:{args.port}/score with {args.num_replicas} Ray "
          f"Serve replica(s){' (token required)' if token else ''}", flush=True)
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    stop.wait()
    serve.shutdown()
    ray.shutdown()


if __name__ == "__main__":
    main()
