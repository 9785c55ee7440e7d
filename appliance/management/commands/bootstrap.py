import secrets

from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand
from django.db import transaction

from ingest.models import Project
from ingest.services.api_keys import api_key_create


class Command(BaseCommand):
    help = "First start only: create an admin user with a generated password and a default project with a key."

    def add_arguments(self, parser):
        parser.add_argument("--username", default="admin")
        parser.add_argument("--project", default="default")

    @transaction.atomic
    def handle(self, *args, username: str, project: str, **options):
        User = get_user_model()
        if User.objects.filter(is_superuser=True).exists():
            self.stdout.write("admin user exists; nothing to bootstrap")
            return
        password = secrets.token_urlsafe(18)
        user = User.objects.create_superuser(username=username, email="", password=password)
        proj, _ = Project.objects.get_or_create(name=project)
        proj.members.add(user)
        _, raw_key = api_key_create(project=proj, name="bootstrap")
        bar = "=" * 72
        self.stdout.write(
            f"\n{bar}\n llm-observe first start: these are shown ONCE, store them now\n"
            f"   console / admin login : {username} / {password}\n"
            f"   API key ({project})    : {raw_key}\n"
            f" change the password at /password/ ; more keys: manage.py create_api_key --project NAME\n{bar}\n"
        )
