"""Lift a login lock-out at once instead of waiting LOGIN_LOCKOUT_SECONDS."""

from django.core.management.base import BaseCommand, CommandError

from console.throttle import login_unlock


class Command(BaseCommand):
    help = "Clear the failed-login counter and lock of an account name and/or a client address."

    def add_arguments(self, parser):
        parser.add_argument("--user", help="account name (as typed on the login form)")
        parser.add_argument("--address", help="client address (REMOTE_ADDR)")

    def handle(self, *args, user=None, address=None, **options):
        if not user and not address:
            raise CommandError("name an account (--user) or an address (--address)")
        login_unlock(username=user, address=address)
        self.stdout.write(f"unlocked: {', '.join(x for x in (user, address) if x)}")
