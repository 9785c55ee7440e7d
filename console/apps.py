from django.apps import AppConfig


class ConsoleConfig(AppConfig):
    name = "console"
    verbose_name = "Console"

    def ready(self):
        from django.contrib.auth.signals import user_logged_in, user_login_failed

        from console import throttle

        user_login_failed.connect(throttle.on_login_failed, dispatch_uid="console.throttle.failed")
        user_logged_in.connect(throttle.on_logged_in, dispatch_uid="console.throttle.logged_in")
