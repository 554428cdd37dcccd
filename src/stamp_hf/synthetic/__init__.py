"""The synthetic-shapes benchmark and the kit that builds the bundled demo model from it (the model itself and its
loader: stamp_hf.demo_model). Nothing at inference imports this.

- `scenes`: the seeded generator: scenes, exact masks, requests, questions and chats; its train / val / test splits
  and the gRefCOCO- and LLaVA-layout exports that `stamp-hf prepare-data` reads.
- `chats`: the v3 conversations (`version="v3"` of the writers): every question kind, chats that switch targets
  and refer back, multi-target requests with one labelled `<|seg|>` per target, a tag per assistant turn.
- `scoring`: the v3 scores (VQA per kind, descriptions, chat target switches, multi-target answers).
- `drawn`: the separately drawn held-out set (plain PIL primitives, a person's words).
- `stages`: what each stage of the build does: the demo tokenizer, the plain Qwen2-VL base, its vision and dialogue
  training, the evaluation on both held-out sets, the model card.
- `build`: the build itself, `python -m stamp_hf.synthetic.build --ship demo_model`: every stage with the package's
  public commands, cached and resumable, then the results tables (and the Table 6 ablation).
"""
