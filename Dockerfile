FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY nudges ./nudges
COPY rules ./rules
COPY seeds ./seeds
RUN pip install --no-cache-dir .
ENV NUDGES_HOST=0.0.0.0 NUDGES_RULES=/app/rules
EXPOSE 8080
HEALTHCHECK --interval=10s --timeout=3s CMD python -c "import urllib.request,sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:8080/readyz').status != 200)"
CMD ["nudges", "serve", "--config", "/app/config.yaml"]
