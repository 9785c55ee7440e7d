"""Creating projects and changing their settings (console and admin)."""

from __future__ import annotations

from django.db import transaction

from ingest.models import Project


@transaction.atomic
def project_create(*, name: str, owner) -> Project:
    """A new project whose first member is its creator. The caller validated the name."""
    project = Project(name=name)
    project.full_clean()
    project.save()
    project.members.add(owner)
    return project


def project_update_settings(*, project: Project, sampling_rate: float | None, redaction_mode: str,
                            retention_days: int | None) -> Project:
    project.sampling_rate = sampling_rate
    project.redaction_mode = redaction_mode
    project.retention_days = retention_days
    project.full_clean()
    project.save(update_fields=["sampling_rate", "redaction_mode", "retention_days"])
    # Ingest reads the project with the API key: forget cached keys so the change applies now.
    from ingest.selectors.api_keys import api_key_cache_clear

    api_key_cache_clear()
    return project
