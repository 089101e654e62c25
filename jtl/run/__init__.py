"""How a run goes: ``birth`` (where the model's state comes from), ``loop`` (the
one training loop). Recipes (``jtl.pretrain``, ``jtl.finetune``) assemble data,
task and evaluation and call them."""
