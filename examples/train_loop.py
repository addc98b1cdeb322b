"""RoSA in a plain PyTorch training loop: RosaLinear layers, the phase scheduler, saving and merging.

    python examples/train_loop.py

A small MLP learns a nonlinear regression. Its pretrained stand-in weights stay frozen; the adapters
train: LoRA alone for a few warm-up steps, then one step of gradient collection, then the masks are
selected and LoRA + the sparse adapter train together. Runs in seconds on a CPU.
"""

import tempfile

import torch
from torch import nn

import rosa_kernels
from rosa_kernels import RosaConfig, RosaModel, get_rosa_model

torch.manual_seed(0)
base = nn.Sequential(nn.Linear(32, 128), nn.GELU(), nn.Linear(128, 128), nn.GELU(), nn.Linear(128, 1))
x = torch.randn(2048, 32)
y = torch.sin(x[:, :4].sum(1)) + 0.5 * x[:, 4] * x[:, 5]

config = RosaConfig(rank=4, density=0.02, alpha=16, dropout=0.0, target_modules=["0", "2"],
                    warmup_steps=20, collect_steps=1, rule="fisher")
model = get_rosa_model(base, config)  # the named nn.Linear become RosaLinear; all else is frozen
model.print_trainable_parameters()
scheduler = model.scheduler()  # warm-up -> collection -> mask selection -> sparse, by step count
optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)

for step in range(200):
    batch = torch.randint(0, x.shape[0], (128,))
    loss = (model(x[batch]).squeeze(-1) - y[batch]).square().mean()
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    scheduler.step()  # after the optimizer step
    if step % 40 == 0 or step == 199:
        print(f"step {step:3d}  phase {scheduler.phase:7s}  loss {loss.item():.4f}")

with tempfile.TemporaryDirectory() as directory:
    model.save_pretrained(directory)  # adapter_config.json + adapter_model.safetensors (int32 CSR masks)
    fresh = nn.Sequential(nn.Linear(32, 128), nn.GELU(), nn.Linear(128, 128), nn.GELU(), nn.Linear(128, 1))
    fresh.load_state_dict({k.removeprefix("base_model."): v for k, v in model.state_dict().items()
                           if not any(s in k for s in ("lora_", "sparse_values", "row_", "col_", "has_mask"))})
    reloaded = RosaModel.from_pretrained(fresh, directory)
    with torch.no_grad():
        print("reloaded adapter matches:", torch.equal(reloaded.eval()(x[:8]), model.eval()(x[:8])))

merged = model.merge_and_unload()  # plain nn.Linear with W + S + scale * B A
print("merged model is plain PyTorch:", not any(isinstance(m, rosa_kernels.RosaLinear) for m in merged.modules()))
