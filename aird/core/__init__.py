"""The shared core: models, prompts, activations, directions and artifacts. No CLI code lives here."""
