"""What counts as a Hugging Face Hub repo id, in one place and without heavy imports: the commands check their
arguments with it before torch loads, and the library decides with it whether a path that is not there is a Hub id."""

import re

# [namespace/]name: letters, digits, "-", "_", "."; not starting with "." or "-" (so never "./x", "../x" or "~/x"),
# no "--" or ".."
REPO_ID = re.compile(r"(?!.*(--|\.\.))[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")
