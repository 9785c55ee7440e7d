"""The admin's login goes through the same throttle as the console's (console.throttle)."""

from django.contrib import admin

from console.throttle import ThrottledAdminAuthenticationForm

admin.site.login_form = ThrottledAdminAuthenticationForm
