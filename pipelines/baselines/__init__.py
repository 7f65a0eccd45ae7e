"""The paper's one-step baselines (Appendix C), each a per-prompt update for the shared training loop.

Every module has the loss written from its Appendix C equation as a pure function (unit-tested on
hand-sized inputs), ``add_flags(parser)`` for its hyper-parameters (the paper's reported values as
defaults where it reports them), and ``METHOD``, a ``pipelines.candidates.Method``:

================ ============================================================= ===============
``draft.py``     DRaFT: backpropagate a differentiable reward (C.1)             reward gradient
``vggflow.py``   VGG-Flow(1-step): regress onto a reward-gradient target (C.2)  reward gradient
``dpo.py``       DPO(1-step): the sigmoid margin of Algorithm A3 (C.3)          ranks only
``grpo.py``      GRPO(1-step): clipped policy gradient in latent space (C.4)    ranks only
================ ============================================================= ===============

Prompts, noises, the one-step generator, the LoRA, the reference (disabled adapters), chunking,
checkpoints, validation and DDP are the loop's, shared with DrPO.
"""
