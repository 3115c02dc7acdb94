"""Cornell Movie-Dialogs and celebrity tweets, read from hand-written fixtures in their original formats."""

import csv

import pytest

from persomux.corpora import cornell, tweets
from persomux.data import DataError

S = b" +++$+++ "


def _write(path, rows):
  """Writes ` +++$+++ `-separated rows of latin-1 bytes, as the corpus ships."""
  path.write_bytes(b"".join(S.join(r) + b"\n" for r in rows))


def _cornell(tmp_path, extra_lines=(), extra_conversations=()):
  """Movie m0 ("harbor nights"): ANNA (u0) and BEN (u1) talk in three conversations,
  CLEO (u2) speaks once. Movie m1 has no titles-metadata row: its title comes
  from the characters metadata. Movie m9 is in no metadata: its id is the title."""
  _write(tmp_path / cornell.TITLES, [
      [b"m0", b"harbor nights", b"1999", b"7.1", b"1200", b"['drama']"],
      [b"m8", b"broken row"]])  # 2 fields: malformed
  _write(tmp_path / cornell.CHARACTERS, [
      [b"u0", b"ANNA", b"m0", b"harbor nights", b"f", b"1"],
      [b"u1", b"BEN", b"m0", b"harbor nights", b"m", b"2"],
      [b"u2", b"CLEO", b"m0", b"harbor nights", b"?", b"?"],
      [b"u3", b"ANNA", b"m1", b"second film", b"f", b"1"],
      [b"u4", b"ANNA", b"m1", b"second film", b"f", b"1"][:5]])  # 5 fields: malformed
  lines = [
      [b"L1", b"u0", b"m0", b"ANNA", b"Meet me at the caf\xe9."],
      [b"L2", b"u1", b"m0", b"BEN", b"Which one?"],
      [b"L3", b"u0", b"m0", b"ANNA", b"The one by the water."],
      [b"L4", b"u1", b"m0", b"BEN", b"Fine."],
      [b"L5", b"u0", b"m0", b"ANNA", b"Late again."],
      [b"L6", b"u1", b"m0", b"BEN", b"Traffic."],
      [b"L7", b"u2", b"m0", b"CLEO", b"Boats leave at nine."],
      [b"L8", b"u0", b"m0", b"ANNA", b"Na\xefve of you."],
      [b"L9", b"u1", b"m0", b"BEN", b""],  # empty text
      [b"L10", b"u3", b"m1", b"ANNA", b"Other film, same name."],
      [b"L11", b"u5", b"m9", b"DOC", b"No metadata here."],
      [b"L12", b"u0", b"m0 +++$+++ extra", b"ANNA", b"six fields"],  # malformed
      *extra_lines]
  _write(tmp_path / cornell.LINES, lines)
  _write(tmp_path / cornell.CONVERSATIONS, [
      [b"u0", b"u1", b"m0", b"['L1', 'L2', 'L3', 'L4']"],
      [b"u0", b"u1", b"m0", b"['L5', 'L6']"],
      [b"u2", b"u0", b"m0", b"['L7', 'L8', 'L9']"],
      [b"u3", b"u3", b"m1", b"['L10']"],
      [b"u5", b"u5", b"m9", b"['L11']"],
      [b"u0", b"u1", b"m0", b"['L1', 'L404']"],  # L404 is not in movie_lines.txt
      [b"u0", b"u1", b"m0"],  # 3 fields: malformed
      *extra_conversations])


def test_cornell_classes_context_and_groups(tmp_path):
  _cornell(tmp_path)
  records, skipped = cornell.read_cornell(str(tmp_path), min_conversations=1, max_context_lines=2)
  assert [(r.cls, r.text, r.context, r.group) for r in records] == [
      ("ANNA (harbor nights)", "Meet me at the caf\u00e9.", None, "m0"),
      ("BEN (harbor nights)", "Which one?", "ANNA: Meet me at the caf\u00e9.", "m0"),
      ("ANNA (harbor nights)", "The one by the water.", "ANNA: Meet me at the caf\u00e9.\nBEN: Which one?", "m0"),
      ("BEN (harbor nights)", "Fine.", "BEN: Which one?\nANNA: The one by the water.", "m0"),
      ("ANNA (harbor nights)", "Late again.", None, "m0"),
      ("BEN (harbor nights)", "Traffic.", "ANNA: Late again.", "m0"),
      ("CLEO (harbor nights)", "Boats leave at nine.", None, "m0"),
      ("ANNA (harbor nights)", "Na\u00efve of you.", "CLEO: Boats leave at nine.", "m0"),
      ("ANNA (second film)", "Other film, same name.", None, "m1"),
      ("DOC (m9)", "No metadata here.", None, "m9")]
  assert all(r.persona is None for r in records)
  assert skipped == {"malformed line": 4, "conversation with missing lines": 1, "empty text": 1}


def test_cornell_min_conversations_drops_records_of_rare_characters(tmp_path):
  _cornell(tmp_path)
  records, skipped = cornell.read_cornell(str(tmp_path), min_conversations=3)
  # ANNA (m0) is in 3 conversations; BEN's third line is empty, so he speaks in only 2.
  assert {r.cls for r in records} == {"ANNA (harbor nights)"}
  assert len(records) == 4
  # 3 of BEN's records, CLEO's, ANNA (second film)'s and DOC's.
  assert skipped["character in too few conversations"] == 6
  # The default context window (4) holds all three earlier lines.
  assert records[1].context == "ANNA: Meet me at the caf\u00e9.\nBEN: Which one?"
  with pytest.raises(DataError, match="no Cornell record survives"):
    cornell.read_cornell(str(tmp_path), min_conversations=4)


def test_cornell_bad_inputs(tmp_path):
  with pytest.raises(DataError, match="no such directory"):
    cornell.read_cornell(str(tmp_path / "absent"))
  _cornell(tmp_path)
  (tmp_path / cornell.CONVERSATIONS).unlink()
  with pytest.raises(DataError, match=r"movie_conversations\.txt: no such file"):
    cornell.read_cornell(str(tmp_path), min_conversations=1)
  _cornell(tmp_path)
  (tmp_path / cornell.LINES).write_bytes(b"")
  with pytest.raises(DataError, match=r"movie_lines\.txt: file is empty"):
    cornell.read_cornell(str(tmp_path), min_conversations=1)
  (tmp_path / cornell.LINES).write_bytes(b"L1 | u0 | m0 | ANNA | wrong separator\n")
  with pytest.raises(DataError, match=r"movie_lines\.txt: no line has the 5 fields"):
    cornell.read_cornell(str(tmp_path), min_conversations=1)


def _csv(path, header, rows):
  with open(path, "w", newline="", encoding="utf-8") as f:
    w = csv.writer(f)
    w.writerow(header)
    w.writerows(rows)


def test_keyword_topic_known_answers():
  assert tweets.keyword_topic("The boats in the harbor at sunset, boats everywhere!") == "boats, harbor, sunset"
  assert tweets.keyword_topic("Sunset over the harbor, with boats") == "sunset, harbor, boats"  # ties: first seen
  assert tweets.keyword_topic("@bigstar I love #Music and music's magic", k=2) == "music, love"
  assert tweets.keyword_topic("it is what it is, we go on 2day", k=3) == ""
  assert tweets.keyword_topic("Caf\u00e9 mornings: caf\u00e9 and croissants", k=5) == "caf\u00e9, mornings, croissants"


def test_clean_tweet():
  assert tweets.clean_tweet("RT @fan_1: Big   news &amp; more https://t.co/xyz\n see www.site.com/a") == \
      "Big news & more see"
  assert tweets.clean_tweet("Not a retweet: RT @x: stays") == "Not a retweet: RT @x: stays"
  assert tweets.clean_tweet("http://a.b/c https://d.e") == ""


@pytest.mark.parametrize("author_column,text_column", [("name", "text"), ("author", "content")])
def test_tweets_columns_cleaning_and_contexts(tmp_path, author_column, text_column):
  p = tmp_path / "tweets.csv"
  _csv(p, ["id", author_column, text_column, "date"], [
      [1, "Ada Star", "RT @fan: Sunset over the harbor with boats https://t.co/abc", "2020"],
      [2, "Ada Star", "https://t.co/only-a-link", "2020"],
      [3, "Bo Singer", "New album &amp; tour\ndates soon!", "2020"],
      [4, "Bo Singer", "so good", "2020"],
      [5, "", "no author for this one", "2020"],
      [6, "Bo Singer", "it is what it is", "2020"]])
  records, skipped = tweets.read_tweets(str(p), author_column=author_column, text_column=text_column)
  assert [(r.cls, r.text, r.context, r.group) for r in records] == [
      ("Ada Star", "Sunset over the harbor with boats", "Write a tweet about: sunset, harbor, boats", None),
      ("Bo Singer", "New album & tour dates soon!", "Write a tweet about: album, tour, dates", None),
      ("Bo Singer", "it is what it is", None, None)]
  assert skipped == {"empty after cleaning": 1, "too short": 1, "missing author": 1}


def test_tweets_per_class_cap_is_seeded_and_in_file_order(tmp_path):
  p = tmp_path / "tweets.csv"
  rows = [["Ada", f"tweet number {i} about harbors"] for i in range(10)] + [["Bo", "only one tweet here"]]
  _csv(p, ["name", "text"], rows)
  records, skipped = tweets.read_tweets(str(p), max_per_class=4, seed=1)
  ada = [int(r.text.split()[2]) for r in records if r.cls == "Ada"]
  assert len(ada) == 4 and ada == sorted(ada)
  assert [r.cls for r in records].count("Bo") == 1
  assert skipped == {"over per-class cap": 6}
  again, _ = tweets.read_tweets(str(p), max_per_class=4, seed=1)
  assert again == records
  samples = {tuple(r.text for r in tweets.read_tweets(str(p), max_per_class=4, seed=s)[0]) for s in range(6)}
  assert len(samples) > 1  # the seed chooses the sample


def test_tweets_bad_inputs(tmp_path):
  p = tmp_path / "tweets.csv"
  _csv(p, ["author", "content"], [["Ada", "hello there world"]])
  with pytest.raises(DataError, match=r"tweets\.csv: missing column 'name'; columns are \['author', 'content'\]"):
    tweets.read_tweets(str(p))
  with pytest.raises(DataError, match=r"missing column 'body'"):
    tweets.read_tweets(str(p), author_column="author", text_column="body")
  empty = tmp_path / "empty.csv"
  empty.write_text("")
  with pytest.raises(DataError, match=r"empty\.csv: file is empty"):
    tweets.read_tweets(str(empty))
  header_only = tmp_path / "header.csv"
  header_only.write_text("name,text\n")
  with pytest.raises(DataError, match=r"header\.csv: no tweet survives"):
    tweets.read_tweets(str(header_only))
  with pytest.raises(DataError, match="no such file"):
    tweets.read_tweets(str(tmp_path / "absent.csv"))


def test_tweets_with_undecodable_bytes_are_counted(tmp_path):
  p = tmp_path / "latin1.csv"
  p.write_bytes(b"name,text\nbob,caf\xe9 is great today friends\nbob,another tweet about boats here\n")
  records, skipped = tweets.read_tweets(str(p))
  assert [r.text for r in records] == ["another tweet about boats here"]
  assert skipped["undecodable bytes"] == 1
