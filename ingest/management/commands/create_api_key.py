from django.core.management.base import BaseCommand, CommandError

from ingest.models import Project
from ingest.services.api_keys import api_key_create, project_get_or_create


class Command(BaseCommand):
    help = "Create an API key for a project and print only the key (the project is created if missing)."

    def add_arguments(self, parser):
        parser.add_argument("--project", required=True, help="project name (a slug: letters, digits, - and _)")
        parser.add_argument("--name", default="cli", help="a label for the key")
        parser.add_argument("--no-create", action="store_true", help="fail if the project does not exist")

    def handle(self, *args, project: str, name: str, no_create: bool, **options):
        from django.core.validators import validate_slug
        from django.core.exceptions import ValidationError

        try:
            validate_slug(project)
        except ValidationError:
            raise CommandError(f"project name {project!r} must be a slug (letters, digits, - and _)") from None
        if no_create:
            try:
                obj = Project.objects.get(name=project)
            except Project.DoesNotExist:
                raise CommandError(f"no project named {project!r}") from None
        else:
            obj, created = project_get_or_create(name=project)
            if created:
                self.stderr.write(f"created project {project!r}")
        _, raw_key = api_key_create(project=obj, name=name)
        self.stdout.write(raw_key)
