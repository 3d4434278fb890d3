# DeLong's test for two correlated ROC curves as pROC computes it (Robin et al., 2011), the reference
# tests/test_compare.py holds worker/compare.py to. Run from this folder: Rscript reference.R > reference.json
# (Debian: apt-get install r-base-core r-cran-proc).
suppressMessages(library(pROC))
d <- read.csv("scores.csv")
curve <- function(s) roc(d$y, d[[s]], levels = c(0, 1), direction = "<", quiet = TRUE)
num <- function(v) sprintf("%.17g", v)
models <- c("a", "b", "c", "d")
cat(sprintf('{"pROC": "%s",\n "models": {\n', packageVersion("pROC")))
lines <- c()
for (m in models) {
  r <- curve(m)
  ci <- ci.auc(r, method = "delong")
  lines <- c(lines, sprintf('  "%s": {"auc": %s, "var": %s, "ci95": [%s, %s]}', m, num(auc(r)), num(var(r, method = "delong")), num(ci[1]), num(ci[3])))
}
cat(paste(lines, collapse = ",\n"), "\n },\n \"pairs\": [\n")
lines <- c()
for (p in combn(models, 2, simplify = FALSE)) {
  r1 <- curve(p[1]); r2 <- curve(p[2])
  t <- roc.test(r1, r2, method = "delong", paired = TRUE)
  lines <- c(lines, sprintf('  {"first": "%s", "second": "%s", "z": %s, "p_value": %s, "cov": %s}', p[1], p[2], num(t$statistic), num(t$p.value), num(cov(r1, r2, method = "delong"))))
}
cat(paste(lines, collapse = ",\n"), "\n ]}\n")
