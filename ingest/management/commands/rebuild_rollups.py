from django.core.management.base import BaseCommand, CommandError

from ingest.models import Project
from ingest.services.rollups import rollups_rebuild


class Command(BaseCommand):
    help = "Recompute the console's hourly roll-ups from the span table (all projects, or one)."

    def add_arguments(self, parser):
        parser.add_argument("--project", help="project name (default: every project)")

    def handle(self, *args, **options):
        project_id = None
        if options["project"]:
            project = Project.objects.filter(name=options["project"]).first()
            if project is None:
                raise CommandError(f"no project named {options['project']!r}")
            project_id = project.id
        counted = rollups_rebuild(project_id=project_id,
                                  progress=lambda n: self.stderr.write(f"\r{n:,} spans", ending=""))
        self.stderr.write("")
        self.stdout.write(f"roll-ups rebuilt from {counted:,} spans")
