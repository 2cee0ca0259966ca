"""The web UI for people (docs/ui.md): sign-in, approvals, break-glass, tasks and audit."""
