"""What the agent can do in a turn: commands in the sandbox, patches,
exec sessions, approvals; each a module with one job, its policy an
argument. Empty until the agent lands (PROTOCOL §11)."""
