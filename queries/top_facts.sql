-- The facts with the strongest single restoration per kind: the best score's effect over the
-- fact's own low_score (the highest; the lowest for raw KL), where (token, layer, and head for
-- `head`) it happens, and the prompt; in the metric that facts.sql's variables set. On the
-- recovery scale each fact is its own (per-fact recovery, whichever `recovery`: a ratio of
-- means over one fact is the same but for the floor, which keeps a fact the corruption did
-- not move from dividing by 0).
.read queries/facts.sql
WITH scored AS (
  SELECT t.kind, k.known_id, k.prompt, k.answer, t.token, t.layer, t.head,
         CASE WHEN scale_name() = 'recovery' THEN 1 ELSE k.clean END AS high_score,
         CASE WHEN scale_name() = 'recovery' THEN 0 ELSE k.corrupted END AS low_score,
         CASE WHEN scale_name() = 'recovery'
              THEN (metric_of(t.score, t.logprob, t.logit_diff, t.kl) - k.corrupted) / k.fact_den
              ELSE metric_of(t.score, t.logprob, t.logit_diff, t.kl) END AS value
  FROM traces t JOIN kept k USING (known_id)),
gains AS (SELECT *, better() * (value - low_score) AS gain FROM scored)
SELECT kind, known_id, prompt, answer, better() * max(gain) AS best_effect,
       arg_max(token, gain) AS token, arg_max(layer, gain) AS layer, arg_max(head, gain) AS head,
       high_score, low_score
FROM gains
GROUP BY kind, known_id, prompt, answer, high_score, low_score
QUALIFY row_number() OVER (PARTITION BY kind ORDER BY max(gain) DESC) <= 20
ORDER BY kind, max(gain) DESC;
