"""Content-Security-Policy on HTML responses (Django 5.2 has none of its own; 6.0's SECURE_CSP replaces this).

The policy is settings.CONTENT_SECURITY_POLICY; an empty value sends none. A view that sets its
own header keeps it.
"""

from __future__ import annotations

from django.conf import settings


class ContentSecurityPolicyMiddleware:
    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request):
        response = self.get_response(request)
        policy = settings.CONTENT_SECURITY_POLICY
        if (policy and "Content-Security-Policy" not in response
                and response.get("Content-Type", "").startswith("text/html")):
            response["Content-Security-Policy"] = policy
        return response
