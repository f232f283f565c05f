"""The core refuses in domain terms (core/errors.py); the web alone decides what a refusal
reads as over HTTP, in one table (app.PROBLEMS). A refusal without its row would be a 500."""
import inspect
import subprocess
import sys

from conftest import ROOT
from core import errors


def raisable():
    """The refusals core/errors.py defines for raising: every Refused without a subclass
    (Refused and Invalid are there to be caught)."""
    defined = [value for value in vars(errors).values()
               if inspect.isclass(value) and issubclass(value, errors.Refused)]
    return {refusal for refusal in defined if not refusal.__subclasses__()}


def test_every_refusal_of_the_core_answers_with_its_row_of_the_web_table(conveyor):
    import app as app_module  # (its first import makes an app from the environment)
    web = app_module.app
    assert set(app_module.PROBLEMS) == raisable()
    for refusal, (status, title) in app_module.PROBLEMS.items():
        with web.test_request_context("/v1/jobs"):
            response = web.handle_user_exception(refusal("refused", ["field: why"]))
        assert (response.status_code, response.mimetype, response.get_json()) == (
            status, "application/problem+json",
            {"type": "about:blank", "title": title, "status": status, "detail": "refused",
             "errors": ["field: why"]}), refusal


def test_the_core_errors_know_nothing_of_http():
    assert not [refusal for refusal in raisable()
                if hasattr(refusal, "status") or hasattr(refusal, "title")]
    imported = subprocess.run(
        [sys.executable, "-c", "import sys, core.errors; print(' '.join(sorted(name for name "
         "in sys.modules if name.partition('.')[0] in ('flask', 'werkzeug', 'app'))))"],
        cwd=ROOT, capture_output=True, text=True, check=True)
    assert imported.stdout.strip() == ""
