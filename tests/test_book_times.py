"""The build-time table reads Sphinx's and myst-nb's log lines, colour codes included."""

from utils.book import book_log_times

LOG = ("\x1b[01mreading sources... \x1b[39;49;00m[  9%] \x1b[35mCH02/CH02_first_surgery\x1b[39;49;00m\n"
       "/w/CH02/CH02_first_surgery.ipynb: Executing notebook using local CWD [mystnb]\n"
       "/w/CH02/CH02_first_surgery.ipynb: Executed notebook in 612.30 seconds [mystnb]\n"
       "\x1b[01mreading sources... \x1b[39;49;00m[ 18%] \x1b[35mCH03/CH03_model_anatomy\x1b[39;49;00m\n"
       "/w/CH03/CH03_model_anatomy.ipynb: Using cached notebook: ID=3 [mystnb]\n"
       "\x1b[01mreading sources... \x1b[39;49;00m[ 27%] \x1b[35mintro\x1b[39;49;00m\n")


def test_chapter_times_from_a_build_log():
    assert book_log_times(LOG) == [("CH02/CH02_first_surgery", 612.3), ("CH03/CH03_model_anatomy", None)]
