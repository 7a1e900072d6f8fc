"""AFTER: the same Trainer script meta-learning with metaopt (diff it against hf_trainer_plain.py).

python examples/hf_trainer_meta.py --steps 30
"""

import argparse
import tempfile

import torch
from transformers import TrainingArguments, ViTConfig, ViTForImageClassification

from metaopt import MetaLearner
from metaopt.data import EpisodeDataset
from metaopt.data.glyphs import GlyphTasks
from metaopt.integrations.transformers import LogitsOf, MetaTrainer

parser = argparse.ArgumentParser()
parser.add_argument("--steps", type=int, default=30)
args = parser.parse_args()
torch.manual_seed(0)

glyphs = GlyphTasks(seed=0)
images = torch.cat([glyphs.draw(c, 40) for c in range(5)])
labels = torch.arange(5).repeat_interleave(40)
dataset = [{"pixel_values": x, "labels": y} for x, y in zip(images, labels)]
episodes = EpisodeDataset(dataset, ways=5, shots=1, query=5, labels=labels.tolist(), image_key="pixel_values")

config = ViTConfig(
    image_size=28,
    patch_size=7,
    num_channels=1,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=64,
    num_labels=5,
    attn_implementation="eager",
)
model = ViTForImageClassification(config)
training = TrainingArguments(
    output_dir=tempfile.mkdtemp(),
    max_steps=args.steps,
    per_device_train_batch_size=4,
    report_to=[],
    use_cpu=True,
    save_strategy="no",
    disable_tqdm=True,
)
learner = MetaLearner(LogitsOf(model), ["shot"], inner_steps=1, inner_lr=0.1)
trainer = MetaTrainer(learner=learner, args=training, train_dataset=episodes)
result = trainer.train()
print(f"step {trainer.state.global_step}: loss {result.training_loss:.4f}")
