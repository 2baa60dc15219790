"""Role actor classes (trainer, critic, reference, reward, rollout); each is used through an ActorMesh."""
