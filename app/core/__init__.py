"""The bottom layer every feature shares: the job contract.

jobs.py        the job row (RetroTest), its chunks and result files, its states, where its results live, and the
               one lookup of a job within a caller's scope
transitions.py the state machine: the allowed moves and `advance`, the only function that makes one
partners.py    the partner row every job belongs to
scope.py       which partners a caller may see (PartnerScope)

It imports only the modules below it (app.db, app.errors, app.clock, app.metrics); the feature packages
(auth, partners, retro_tests, downloads, web), app/integrations and worker/ import it, never the other way
round (scripts/check_layers.py).
"""
