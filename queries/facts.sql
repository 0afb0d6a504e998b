-- The sweep's tables as views. Every query file starts with `.read queries/facts.sql`; set the
-- sweep folder first (a local path or an s3:// URL DuckDB can read), and optionally, as the
-- flags of `coordinator aggregate` of the same names:
--   facts    'correct' (default: Figure 2's rule) or 'all' (ROME's Figure 3 notebook, for a
--            sweep run with --correctness none)
--   metric   'prob' (default), 'logprob', 'logit_diff' or 'kl' (any but prob needs a sweep of
--            table schema 4)
--   scale    'raw' (default) or 'recovery': (m − corrupted) / (clean − corrupted)
--   recovery 'ratio-of-means' (default: averages divided by their ATE) or 'per-fact' (each
--            fact's values mapped first), with scale 'recovery'
--   floor    0.01 (default): per-fact recovery's least |clean − corrupted|
--   duckdb -cmd "SET VARIABLE results = 'sweeps/sweep-0123456789ab'" -c ".read queries/rollup.sql"
--   duckdb -cmd "SET VARIABLE results = '...'" -cmd "SET VARIABLE facts = 'all'" -c ".read queries/figure3.sql"
--   duckdb -cmd "SET VARIABLE results = '...'" -cmd "SET VARIABLE metric = 'logit_diff'" \
--          -cmd "SET VARIABLE scale = 'recovery'" -c ".read queries/rollup.sql"
-- The views below hand every query `score`, `high_score` and `low_score` already in the
-- metric (and mapped per fact for per-fact recovery); recovery as a ratio of means depends on
-- which facts are averaged, so each query applies it to its averages with `on_scale`,
-- `effect` and `spread`.
CREATE OR REPLACE MACRO metric_name() AS coalesce(getvariable('metric'), 'prob');
CREATE OR REPLACE MACRO scale_name() AS coalesce(getvariable('scale'), 'raw');
CREATE OR REPLACE MACRO recovery_name() AS coalesce(getvariable('recovery'), 'ratio-of-means');
CREATE OR REPLACE MACRO recovery_floor() AS coalesce(getvariable('floor'), 0.01)::DOUBLE;
CREATE OR REPLACE MACRO per_fact() AS
  scale_name() = 'recovery' AND recovery_name() = 'per-fact';
CREATE OR REPLACE MACRO ratio_of_means() AS
  scale_name() = 'recovery' AND recovery_name() = 'ratio-of-means';
-- The scale as the aggregate's tables name it (their `scale` column).
CREATE OR REPLACE MACRO scale_tag() AS
  CASE WHEN scale_name() = 'raw' THEN 'raw' ELSE 'recovery-' || recovery_name() END;
-- The settings, checked: true, or an error naming the variable.
CREATE OR REPLACE MACRO settings_checked() AS CASE
  WHEN metric_name() NOT IN ('prob', 'logprob', 'logit_diff', 'kl')
    THEN error('metric = ''' || metric_name() || ''': one of prob, logprob, logit_diff, kl')
  WHEN scale_name() NOT IN ('raw', 'recovery')
    THEN error('scale = ''' || scale_name() || ''': raw or recovery')
  WHEN recovery_name() NOT IN ('ratio-of-means', 'per-fact')
    THEN error('recovery = ''' || recovery_name() || ''': ratio-of-means or per-fact')
  WHEN NOT recovery_floor() > 0
    THEN error('floor = ' || recovery_floor() || ': must be positive')
  ELSE true END;
-- A traces row's value of the metric (`score` is prob's column).
CREATE OR REPLACE MACRO metric_of(score, logprob, logit_diff, kl) AS
  CASE metric_name() WHEN 'prob' THEN score WHEN 'logprob' THEN logprob
                     WHEN 'logit_diff' THEN logit_diff ELSE kl END;
-- An average `m` over facts whose mean clean value is `high` and mean corrupted value `low`,
-- on the scale: divided by the ATE for recovery as a ratio of means, else as it is
-- (`+ 0.0` turns −0 into 0, as the aggregate writes it).
CREATE OR REPLACE MACRO on_scale(m, high, low) AS
  CASE WHEN ratio_of_means() THEN (m - low) / (high - low) + 0.0 ELSE m END;
-- The average effect of `m`: on_scale(m) − on_scale(low) (AIE, or AIE / ATE).
CREATE OR REPLACE MACRO effect(m, high, low) AS on_scale(m, high, low) - on_scale(low, high, low);
-- A standard deviation of values averaged as above.
CREATE OR REPLACE MACRO spread(s, high, low) AS
  CASE WHEN ratio_of_means() THEN s / abs(high - low) ELSE s END;
-- +1, or −1 where a smaller value is nearer the clean run (raw KL): "best" is the largest
-- effect times this.
CREATE OR REPLACE MACRO better() AS
  CASE WHEN metric_name() = 'kl' AND scale_name() = 'raw' THEN -1 ELSE 1 END;
-- Tables of schema < 4 lack the metric columns: null there, refused below for any metric
-- but prob.
-- Only the files a journal commit names: a flush writes its Parquet files before its commit
-- (`_journal/<seq>.json`), so a sweep read while it runs, or after a crash, can hold files
-- no commit names yet (a restarted coordinator deletes them). Reading these lists instead of
-- globbing the folders shows exactly the committed rows, each once.
SET VARIABLE committed = (
  SELECT list(getvariable('results') || '/' || f ORDER BY f)
  FROM (SELECT unnest(files) AS f
        FROM read_json(getvariable('results') || '/_journal/*.json',
                       columns = {files: 'VARCHAR[]'})));
SET VARIABLE committed_facts = list_filter(getvariable('committed'), lambda f: f LIKE '%/facts/%');
SET VARIABLE committed_traces = list_filter(getvariable('committed'), lambda f: f LIKE '%/traces/%');
CREATE OR REPLACE VIEW facts AS
  SELECT * FROM read_parquet(getvariable('committed_facts'))
  UNION ALL BY NAME
  SELECT NULL::DOUBLE AS clean_logprob, NULL::DOUBLE AS clean_logit_diff,
         NULL::DOUBLE AS clean_kl, NULL::DOUBLE AS corrupted_logprob,
         NULL::DOUBLE AS corrupted_logit_diff, NULL::DOUBLE AS corrupted_kl
  WHERE false;
CREATE OR REPLACE VIEW traces AS
  SELECT * FROM read_parquet(getvariable('committed_traces'), hive_partitioning = true)
  UNION ALL BY NAME
  SELECT NULL::FLOAT AS logprob, NULL::FLOAT AS logit_diff, NULL::FLOAT AS kl WHERE false;
-- The traced facts the facts rule keeps, with the metric's clean and corrupted values (prob's
-- are high_score and low_score, as the aggregate reads them); `fact_den`, per-fact recovery's
-- denominator: clean − corrupted kept at least `floor` from 0 with its sign (0 counting as
-- positive); the map of the fact's values v ↦ (v − shift) / den (the identity but for
-- per-fact recovery: v ↦ (v − corrupted) / fact_den), and `high`, `low`: the clean and
-- corrupted values on that map (1 and 0 per fact).
CREATE OR REPLACE VIEW kept_values AS
  SELECT f.* EXCLUDE (high_score, low_score), m.clean, m.corrupted,
         CASE WHEN abs(m.clean - m.corrupted) >= recovery_floor() THEN m.clean - m.corrupted
              WHEN m.clean - m.corrupted < 0 THEN -recovery_floor()
              ELSE recovery_floor() END AS fact_den
  FROM facts f,
       LATERAL (SELECT
         CASE WHEN settings_checked() AND metric_name() <> 'prob' AND f.clean_kl IS NULL
              THEN error('metric = ''' || metric_name() || ''': this sweep''s facts have no '
                         || 'clean_' || metric_name() || ' column (table schema < 4 records '
                         || 'only prob): use metric = ''prob''')
              WHEN metric_name() = 'prob' THEN f.high_score::DOUBLE
              WHEN metric_name() = 'logprob' THEN f.clean_logprob
              WHEN metric_name() = 'logit_diff' THEN f.clean_logit_diff
              ELSE f.clean_kl END AS clean,
         CASE metric_name() WHEN 'prob' THEN f.low_score::DOUBLE
                            WHEN 'logprob' THEN f.corrupted_logprob
                            WHEN 'logit_diff' THEN f.corrupted_logit_diff
                            ELSE f.corrupted_kl END AS corrupted) m
  WHERE f.traced AND (coalesce(getvariable('facts'), 'correct') = 'all' OR coalesce(f.correct, true));
CREATE OR REPLACE VIEW kept AS
  SELECT *, CASE WHEN per_fact() THEN corrupted ELSE 0 END::DOUBLE AS shift,
         CASE WHEN per_fact() THEN fact_den ELSE 1 END::DOUBLE AS den,
         CASE WHEN per_fact() THEN 1 ELSE clean END::DOUBLE AS high,
         CASE WHEN per_fact() THEN 0 ELSE corrupted END::DOUBLE AS low
  FROM kept_values;
-- Facts averaged per kind: kept, with every row of the kind present. A fact has a row per
-- traced token (`traced_tokens`, the experiment's token selector) per layer, per head for a
-- kind whose rows carry one (`head`): a fact whose job was given up is left out, as
-- `coordinator aggregate` does. high_score and low_score are the metric's, on the map.
CREATE OR REPLACE VIEW averaged AS
  SELECT t.kind, k.known_id, k.relation_id, k.high AS high_score, k.low AS low_score,
         k.shift, k.den, k.subject_start AS b, k.subject_end AS e, len(k.tokens) AS n_tokens
  FROM kept k JOIN traces t USING (known_id)
  GROUP BY ALL
  HAVING count(*) = len(any_value(k.traced_tokens)) * any_value(k.n_layers)
                    * CASE WHEN bool_or(t.head IS NOT NULL) THEN any_value(k.n_heads) ELSE 1 END;
-- The token roles the experiment traced (`--tokens`), from the manifest.
CREATE OR REPLACE VIEW asked AS
  SELECT settings.experiment.tokens AS roles
  FROM read_json(getvariable('results') || '/manifest.json');
-- ROME's token categories (notebook average_causal_effects), overlapping as there: a
-- one-token subject is its first and last token; when e = T-1 the last token is also the
-- first subsequent one; a subject ending the prompt has no first subsequent token. Only the
-- categories the selector asked for: a one-token subject's last subject token, traced alone,
-- does not stand for the first subject tokens of all facts. `score` is the metric's value on
-- the fact's map.
CREATE OR REPLACE VIEW categorized AS
  SELECT a.kind, a.known_id, a.relation_id, t.layer, t.head, t.token,
         (metric_of(t.score, t.logprob, t.logit_diff, t.kl) - a.shift) / a.den AS score,
         c.category, c.row_order
  FROM averaged a
  JOIN traces t ON t.known_id = a.known_id AND t.kind = a.kind
  JOIN (VALUES ('first_subject', 0), ('middle_subject', 1), ('last_subject', 2),
               ('first_subsequent', 3), ('further', 4), ('last', 5)) c(category, row_order)
    ON (SELECT list_contains(roles, 'all') OR list_contains(roles, replace(c.category, '_', '-'))
        FROM asked)
   AND CASE c.category
         WHEN 'first_subject' THEN t.token = a.b
         WHEN 'middle_subject' THEN t.token > a.b AND t.token < a.e - 1
         WHEN 'last_subject' THEN t.token = a.e - 1
         WHEN 'first_subsequent' THEN t.token = a.e AND a.e < a.n_tokens
         WHEN 'further' THEN t.token > a.e AND t.token < a.n_tokens - 1
         ELSE t.token = a.n_tokens - 1
       END;
