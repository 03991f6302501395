"""The parts every stage is built from: model kinds and connectors, the trainable set-up, batching, losses, the
one training loop, generation, export, BitDelta, memory. Nothing here imports a stage, the demo or the CLI."""

