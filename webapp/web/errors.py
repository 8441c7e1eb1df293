"""Friendly error pages for the browser door."""
from flask import render_template


def http_error_page(exc):
    return render_template("error.html", code=exc.code, title=exc.name,
                           message=exc.description), exc.code


def internal_error_page():
    return render_template("error.html", code=500, title="Something went wrong",
                           message="Something went wrong on our side. Your messages are saved; "
                                   "please try again."), 500
